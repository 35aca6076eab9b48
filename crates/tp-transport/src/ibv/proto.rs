//! The ibv ring and acknowledgement protocol, without verbs.
//!
//! Each side registers an **inbox** ring that the peer may RDMA-write into, and keeps an
//! **outbox** ring of the same capacity in local memory. Both rings index the byte stream
//! the same way (`position % capacity`), so a byte written at outbox offset `o` lands at
//! inbox offset `o` on the peer.
//!
//! - Writer ([`Sender`]): the producer copies bytes into the outbox
//!   ([`Sender::commit`]); [`Sender::poll_write`] then yields the RDMA writes to post
//!   (at most two per call: a range may wrap), each carrying its length as immediate
//!   data; [`Sender::on_ack`] frees outbox space when the peer acknowledges bytes it has
//!   consumed.
//! - Reader ([`Receiver`]): each arriving write-with-immediate advances the landed
//!   marker ([`Receiver::on_write`]); the consumer reads [`Receiver::readable`] ranges and
//!   [`Receiver::consume`]s them; [`Receiver::poll_ack`] yields how many bytes to
//!   acknowledge (batched, at least [`Receiver::ack_threshold`] or everything when the
//!   inbox drains).
//!
//! Flow control: the writer never has more than `capacity` bytes unacknowledged, so it
//! never overwrites inbox bytes the reader has not consumed. A peer that claims more
//! bytes than that (in a write immediate or an ack) is a protocol error, not a panic.
//!
//! [`SetupInfo`] is the bootstrap record exchanged over TCP, in an explicit little-endian
//! layout (the original sent a raw host-layout C struct).

use core::fmt;

/// A protocol violation by the peer.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ProtoError {
    /// The peer wrote more than the inbox could hold.
    InboxOverflow {
        /// Bytes it would hold.
        would_hold: u64,
        /// Capacity.
        capacity: u64,
    },
    /// The peer acknowledged bytes that were never posted.
    AckBeyondPosted {
        /// Acknowledged so far, including this ack.
        acked: u64,
        /// Posted so far.
        posted: u64,
    },
    /// More write completions than writes posted.
    UnexpectedCompletion,
    /// A setup record that does not parse.
    BadSetup(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InboxOverflow {
                would_hold,
                capacity,
            } => {
                write!(
                    f,
                    "peer overfilled the inbox: {would_hold} bytes in a {capacity}-byte ring"
                )
            }
            Self::AckBeyondPosted { acked, posted } => {
                write!(
                    f,
                    "peer acknowledged {acked} bytes, only {posted} were sent"
                )
            }
            Self::UnexpectedCompletion => f.write_str("write completion without a posted write"),
            Self::BadSetup(why) => write!(f, "bad setup record: {why}"),
        }
    }
}

impl core::error::Error for ProtoError {}

/// One RDMA write-with-immediate to post.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct RdmaWrite {
    /// Offset in the local outbox (and in the peer's inbox).
    pub offset: u64,
    /// Bytes to write; also the immediate value.
    pub len: u32,
}

/// The writing side of one connection.
#[derive(Clone, Debug)]
pub struct Sender {
    capacity: u64,
    written: u64,
    posted: u64,
    acked: u64,
    inflight: u32,
    max_inflight: u32,
}

impl Sender {
    /// A sender over rings of `capacity` bytes (a power of two), posting at most
    /// `max_inflight` writes before their completions return.
    pub fn new(capacity: u64, max_inflight: u32) -> Self {
        Self {
            capacity,
            written: 0,
            posted: 0,
            acked: 0,
            inflight: 0,
            max_inflight: max_inflight.max(1),
        }
    }

    /// Bytes the producer may copy into the outbox now, and the offset where they start
    /// (the free space may wrap: copy `min(len, capacity - offset)` first).
    pub fn writable(&self) -> (u64, u64) {
        let used = self.written.wrapping_sub(self.acked);
        (
            self.written % self.capacity,
            self.capacity.saturating_sub(used),
        )
    }

    /// Records that the producer copied `n` more bytes into the outbox.
    ///
    /// Returns `false` (and records nothing) if that exceeds [`Sender::writable`].
    pub fn commit(&mut self, n: u64) -> bool {
        if n > self.writable().1 {
            return false;
        }
        self.written = self.written.wrapping_add(n);
        true
    }

    /// The next RDMA write to post, if any bytes are unposted and the in-flight limit
    /// allows. A range that wraps the ring comes out as two writes.
    pub fn poll_write(&mut self) -> Option<RdmaWrite> {
        let pending = self.written.wrapping_sub(self.posted);
        if pending == 0 || self.inflight >= self.max_inflight {
            return None;
        }
        let offset = self.posted % self.capacity;
        let to_end = self.capacity - offset;
        let len = pending.min(to_end).min(u64::from(u32::MAX));
        self.posted = self.posted.wrapping_add(len);
        self.inflight = self.inflight.saturating_add(1);
        Some(RdmaWrite {
            offset,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        })
    }

    /// A posted write completed locally (its bytes left the outbox buffer's DMA).
    ///
    /// # Errors
    /// [`ProtoError::UnexpectedCompletion`].
    pub fn on_write_complete(&mut self) -> Result<(), ProtoError> {
        self.inflight = self
            .inflight
            .checked_sub(1)
            .ok_or(ProtoError::UnexpectedCompletion)?;
        Ok(())
    }

    /// The peer acknowledged `n` consumed bytes: their outbox space is free again.
    ///
    /// # Errors
    /// [`ProtoError::AckBeyondPosted`] if the peer acknowledges unsent bytes.
    pub fn on_ack(&mut self, n: u32) -> Result<(), ProtoError> {
        let acked = self.acked.wrapping_add(u64::from(n));
        if acked.wrapping_sub(self.acked) > self.posted.wrapping_sub(self.acked) {
            return Err(ProtoError::AckBeyondPosted {
                acked,
                posted: self.posted,
            });
        }
        self.acked = acked;
        Ok(())
    }

    /// Bytes written but not yet acknowledged (0 = everything delivered and consumed).
    pub fn unacknowledged(&self) -> u64 {
        self.written.wrapping_sub(self.acked)
    }

    /// Every committed byte was posted and every posted write completed: it all landed
    /// in the peer's inbox (it may not be consumed yet).
    pub fn delivered(&self) -> bool {
        self.posted == self.written && self.inflight == 0
    }
}

/// The reading side of one connection.
#[derive(Clone, Debug)]
pub struct Receiver {
    capacity: u64,
    landed: u64,
    consumed: u64,
    acked: u64,
    ack_threshold: u64,
}

impl Receiver {
    /// A receiver over an inbox of `capacity` bytes; acknowledges in batches of at
    /// least `ack_threshold` bytes (or everything once the inbox is drained).
    pub fn new(capacity: u64, ack_threshold: u64) -> Self {
        Self {
            capacity,
            landed: 0,
            consumed: 0,
            acked: 0,
            ack_threshold: ack_threshold.clamp(1, capacity),
        }
    }

    /// The batch size for acknowledgements.
    pub const fn ack_threshold(&self) -> u64 {
        self.ack_threshold
    }

    /// A write-with-immediate of `imm` bytes landed in the inbox.
    ///
    /// # Errors
    /// [`ProtoError::InboxOverflow`] if the peer broke flow control.
    pub fn on_write(&mut self, imm: u32) -> Result<(), ProtoError> {
        let landed = self.landed.wrapping_add(u64::from(imm));
        let would_hold = landed.wrapping_sub(self.consumed);
        if would_hold > self.capacity {
            return Err(ProtoError::InboxOverflow {
                would_hold,
                capacity: self.capacity,
            });
        }
        self.landed = landed;
        Ok(())
    }

    /// The readable bytes: offset in the inbox and length (the range may wrap: read
    /// `min(len, capacity - offset)` first).
    pub fn readable(&self) -> (u64, u64) {
        (
            self.consumed % self.capacity,
            self.landed.wrapping_sub(self.consumed),
        )
    }

    /// Records that the consumer read `n` bytes. Returns `false` (nothing recorded) if
    /// that is more than [`Receiver::readable`].
    pub fn consume(&mut self, n: u64) -> bool {
        if n > self.readable().1 {
            return false;
        }
        self.consumed = self.consumed.wrapping_add(n);
        true
    }

    /// How many bytes to acknowledge now, if any (send it as a send-with-immediate).
    pub fn poll_ack(&mut self) -> Option<u32> {
        let unacked = self.consumed.wrapping_sub(self.acked);
        let drained = self.landed == self.consumed;
        if unacked == 0 || (unacked < self.ack_threshold && !drained) {
            return None;
        }
        let n = unacked.min(u64::from(u32::MAX));
        self.acked = self.acked.wrapping_add(n);
        u32::try_from(n).ok()
    }
}

/// What each side sends the other over the TCP bootstrap connection, 64 bytes.
///
/// | offset | field |
/// |---|---|
/// | 0 | magic `tpIBV\0\0\x01` |
/// | 8 | `lid: u16` |
/// | 10 | `mtu: u8` (verbs enum), 1 byte reserved |
/// | 12 | `qpn: u32` (24 bits used) |
/// | 16 | `gid: [u8; 16]` |
/// | 32 | `inbox_addr: u64` |
/// | 40 | `inbox_rkey: u32` |
/// | 44 | `psn: u32` (24 bits used) |
/// | 48 | `inbox_capacity: u64` |
/// | 56 | `max_message: u32`, 4 bytes reserved |
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct SetupInfo {
    /// Local identifier of the port (0 on RoCE).
    pub lid: u16,
    /// Path MTU enum value.
    pub mtu: u8,
    /// Queue pair number.
    pub qpn: u32,
    /// Global identifier.
    pub gid: [u8; 16],
    /// Address of the registered inbox.
    pub inbox_addr: u64,
    /// Remote key of the inbox registration.
    pub inbox_rkey: u32,
    /// Initial packet sequence number.
    pub psn: u32,
    /// Inbox ring size.
    pub inbox_capacity: u64,
    /// Largest message the port accepts.
    pub max_message: u32,
}

/// Magic of a [`SetupInfo`] record.
pub const SETUP_MAGIC: [u8; 8] = *b"tpIBV\0\0\x01";
/// Encoded length of a [`SetupInfo`].
pub const SETUP_LEN: usize = 64;

impl SetupInfo {
    /// Encodes into the fixed 64-byte layout.
    pub fn encode(&self) -> [u8; SETUP_LEN] {
        let mut b = [0u8; SETUP_LEN];
        let mut put = |at: usize, v: &[u8]| {
            if let Some(dst) = b.get_mut(at..at + v.len()) {
                dst.copy_from_slice(v);
            }
        };
        put(0, &SETUP_MAGIC);
        put(8, &self.lid.to_le_bytes());
        put(10, &[self.mtu]);
        put(12, &self.qpn.to_le_bytes());
        put(16, &self.gid);
        put(32, &self.inbox_addr.to_le_bytes());
        put(40, &self.inbox_rkey.to_le_bytes());
        put(44, &self.psn.to_le_bytes());
        put(48, &self.inbox_capacity.to_le_bytes());
        put(56, &self.max_message.to_le_bytes());
        b
    }

    /// Decodes and validates a record.
    ///
    /// # Errors
    /// [`ProtoError::BadSetup`] for a wrong length or magic, reserved bytes that are not
    /// zero, a queue pair or sequence number over 24 bits, or an inbox capacity that is
    /// not a power of two.
    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let b: &[u8; SETUP_LEN] = b
            .try_into()
            .map_err(|_| ProtoError::BadSetup("wrong length"))?;
        let arr = |at: usize| -> [u8; 8] {
            let mut a = [0u8; 8];
            if let Some(src) = b.get(at..at + 8) {
                a.copy_from_slice(src);
            }
            a
        };
        let u32_at = |at: usize| {
            let a = arr(at);
            u32::from_le_bytes([a[0], a[1], a[2], a[3]])
        };
        if arr(0) != SETUP_MAGIC {
            return Err(ProtoError::BadSetup("magic"));
        }
        let a8 = arr(8);
        let mut gid = [0u8; 16];
        if let Some(src) = b.get(16..32) {
            gid.copy_from_slice(src);
        }
        let info = Self {
            lid: u16::from_le_bytes([a8[0], a8[1]]),
            mtu: a8[2],
            qpn: u32_at(12),
            gid,
            inbox_addr: u64::from_le_bytes(arr(32)),
            inbox_rkey: u32_at(40),
            psn: u32_at(44),
            inbox_capacity: u64::from_le_bytes(arr(48)),
            max_message: u32_at(56),
        };
        // Reserved bytes are zero and 24-bit fields fit, so that a record has exactly
        // one encoding (and a future version can use them).
        if b.get(11) != Some(&0) || b.get(60..64) != Some(&[0u8; 4][..]) {
            return Err(ProtoError::BadSetup("reserved bytes are not zero"));
        }
        if info.qpn > 0x00ff_ffff || info.psn > 0x00ff_ffff {
            return Err(ProtoError::BadSetup(
                "queue pair or sequence number over 24 bits",
            ));
        }
        if !info.inbox_capacity.is_power_of_two() {
            return Err(ProtoError::BadSetup("inbox capacity is not a power of two"));
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// An in-memory reliable-connected queue pair: RDMA writes copy the writer's outbox
    /// bytes into the reader's inbox and complete in order; acks travel back in order.
    struct Model {
        cap: u64,
        outbox: Vec<u8>,
        inbox: Vec<u8>,
        sender: Sender,
        receiver: Receiver,
        /// Writes posted, not yet executed by the "NIC".
        wire: VecDeque<RdmaWrite>,
        /// Writes executed whose local completion is not yet reported.
        completions: u32,
        /// Acks in flight back to the writer.
        acks: VecDeque<u32>,
        /// Stream bytes produced / consumed.
        produced: u64,
        consumed: Vec<u8>,
    }

    impl Model {
        fn new(cap: u64, max_inflight: u32, threshold: u64) -> Self {
            Self {
                cap,
                outbox: vec![0; cap as usize],
                inbox: vec![0; cap as usize],
                sender: Sender::new(cap, max_inflight),
                receiver: Receiver::new(cap, threshold),
                wire: VecDeque::new(),
                completions: 0,
                acks: VecDeque::new(),
                produced: 0,
                consumed: Vec::new(),
            }
        }

        fn byte(i: u64) -> u8 {
            (i % 251) as u8
        }

        /// Producer copies up to `n` stream bytes into the outbox.
        fn produce(&mut self, n: u64) {
            let (off, free) = self.sender.writable();
            let n = n.min(free);
            for k in 0..n {
                self.outbox[((off + k) % self.cap) as usize] = Self::byte(self.produced + k);
            }
            assert!(self.sender.commit(n));
            self.produced += n;
            while let Some(w) = self.sender.poll_write() {
                self.wire.push_back(w);
            }
        }

        /// The NIC executes the oldest posted write (RC: in order).
        fn deliver_write(&mut self) {
            if let Some(w) = self.wire.pop_front() {
                let (o, l) = (w.offset as usize, w.len as usize);
                assert!(o + l <= self.cap as usize, "a write crossed the ring end");
                self.inbox[o..o + l].copy_from_slice(&self.outbox[o..o + l]);
                self.receiver.on_write(w.len).unwrap();
                self.completions += 1;
            }
        }

        fn complete_write(&mut self) {
            if self.completions > 0 {
                self.completions -= 1;
                self.sender.on_write_complete().unwrap();
                while let Some(w) = self.sender.poll_write() {
                    self.wire.push_back(w);
                }
            }
        }

        /// Consumer reads up to `n` bytes, then maybe acknowledges.
        fn consume(&mut self, n: u64) {
            let (off, avail) = self.receiver.readable();
            let n = n.min(avail);
            for k in 0..n {
                self.consumed
                    .push(self.inbox[((off + k) % self.cap) as usize]);
            }
            assert!(self.receiver.consume(n));
            if let Some(a) = self.receiver.poll_ack() {
                self.acks.push_back(a);
            }
        }

        fn deliver_ack(&mut self) {
            if let Some(a) = self.acks.pop_front() {
                self.sender.on_ack(a).unwrap();
            }
        }
    }

    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn random_schedules_deliver_every_byte_in_order_without_overwrites() {
        for seed in 0..200u64 {
            let mut rng = seed;
            let cap = 1u64 << (6 + seed % 5);
            let mut m = Model::new(cap, 1 + (seed % 4) as u32, 1 + seed % cap);
            let total = 20 * cap;
            let mut steps = 0;
            while (m.consumed.len() as u64) < total {
                steps += 1;
                assert!(steps < 1_000_000, "seed {seed}: no progress");
                match splitmix(&mut rng) % 5 {
                    0 => {
                        let left = total - m.produced;
                        m.produce((splitmix(&mut rng) % (cap + 1)).min(left));
                    }
                    1 => m.deliver_write(),
                    2 => m.complete_write(),
                    3 => m.consume(splitmix(&mut rng) % (cap + 1)),
                    _ => m.deliver_ack(),
                }
            }
            for (i, b) in m.consumed.iter().enumerate() {
                assert_eq!(*b, Model::byte(i as u64), "seed {seed}: byte {i}");
            }
            // Drain: every byte ends up acknowledged.
            while let Some(a) = m.acks.pop_front() {
                m.sender.on_ack(a).unwrap();
            }
            if let Some(a) = m.receiver.poll_ack() {
                m.sender.on_ack(a).unwrap();
            }
            assert_eq!(m.sender.unacknowledged(), 0, "seed {seed}");
        }
    }

    #[test]
    fn a_peer_breaking_flow_control_is_an_error_not_a_panic() {
        let mut r = Receiver::new(64, 16);
        r.on_write(60).unwrap();
        assert_eq!(
            r.on_write(5),
            Err(ProtoError::InboxOverflow {
                would_hold: 65,
                capacity: 64
            })
        );
        assert_eq!(
            r.on_write(u32::MAX).unwrap_err(),
            ProtoError::InboxOverflow {
                would_hold: 60 + u64::from(u32::MAX),
                capacity: 64
            }
        );
        let mut s = Sender::new(64, 2);
        assert!(s.commit(10));
        assert!(!s.commit(100), "more than the free space is refused");
        let w = s.poll_write().unwrap();
        assert_eq!(w, RdmaWrite { offset: 0, len: 10 });
        assert!(matches!(
            s.on_ack(11),
            Err(ProtoError::AckBeyondPosted { .. })
        ));
        s.on_write_complete().unwrap();
        assert_eq!(s.on_write_complete(), Err(ProtoError::UnexpectedCompletion));
    }

    #[test]
    fn writes_split_at_the_ring_end() {
        let mut s = Sender::new(64, 8);
        assert!(s.commit(60));
        assert_eq!(s.poll_write(), Some(RdmaWrite { offset: 0, len: 60 }));
        s.on_ack(60).unwrap();
        assert!(s.commit(10));
        assert_eq!(s.poll_write(), Some(RdmaWrite { offset: 60, len: 4 }));
        assert_eq!(s.poll_write(), Some(RdmaWrite { offset: 0, len: 6 }));
        assert_eq!(s.poll_write(), None);
    }

    #[test]
    fn setup_info_round_trips_and_rejects_garbage() {
        let info = SetupInfo {
            lid: 7,
            mtu: 5,
            qpn: 0x00ab_cdef,
            gid: [9; 16],
            inbox_addr: 0x7f00_dead_beef,
            inbox_rkey: 42,
            psn: 0x12_3456,
            inbox_capacity: 2 << 20,
            max_message: 1 << 30,
        };
        let b = info.encode();
        assert_eq!(&b[..8], b"tpIBV\0\0\x01");
        assert_eq!(SetupInfo::decode(&b), Ok(info));
        assert!(SetupInfo::decode(&b[..63]).is_err());
        let mut bad = b;
        bad[0] = b'x';
        assert!(SetupInfo::decode(&bad).is_err());
        let mut bad = b;
        bad[48] = 3;
        assert!(SetupInfo::decode(&bad).is_err());
        // One encoding per record: reserved bytes and the top byte of 24-bit fields.
        for at in [11, 15, 47, 60, 63] {
            let mut bad = b;
            bad[at] = 1;
            assert!(SetupInfo::decode(&bad).is_err(), "byte {at}");
        }
    }
}
