//! cuda_basic's shared staging: when both ends run on one machine, each side's chunks
//! go through slots in a shared-memory segment that both processes map and register
//! with the GPU. The sender's GPU copies a chunk into a slot, the receiver's GPU copies
//! it out of the same pages: no CPU copy and no CPU channel in between.
//!
//! **Setup**, at the channel's first operation (a channel that never carries a GPU
//! tensor pins nothing; both ends' first operations, whichever they are, meet in it),
//! on the channel's two staging connections (the last two): each side creates its
//! *outbox* — a sealed memfd of one header page (a random 16-byte token) and `slots ×
//! slot_len` bytes — registers it with the GPU, and sends a [`StagingSetup`] frame on
//! the first: "map fd `fd` of process `pid` on host `host`,
//! expect this token and size". Each side then opens the peer's memfd through
//! `/proc/<pid>/fd/<fd>` (same machine, same pid namespace, the same user or one
//! allowed to read the peer's fds), checks size and token, registers it, and answers
//! one byte on the second connection: 0 mapped, 1 not. Staging is used when both sides
//! mapped; otherwise every chunk goes over the CPU channel as before, and the log says
//! why.
//!
//! **Per chunk** (`slot_len` bytes, the last one shorter; the sender's slot size
//! decides, so the two sides need not agree), sender → receiver, chunks numbered per
//! direction over the channel's life and taking the slots in turn:
//! - the sender waits for a free slot (it starts with `slots`; each release byte gives
//!   one back), copies the chunk in (the GPU, on the buffer's stream, after the
//!   producer's work; or the CPU), waits for that copy, and writes a *notice* on the
//!   first connection: the chunk's length, u32 LE;
//! - the receiver reads the notice, checks the length is the one it expects, copies the
//!   slot out (the GPU on its buffer's stream, or the CPU), waits for the copy, and
//!   writes a *release*, one byte 0, on the second connection.
//!
//! A send completes once all its chunks are staged and announced (the receiver may
//! still be copying them out: the slots, not the sender's buffer, hold them); a receive
//! once all its chunks are in place. Up to `slots` chunks of a direction are in flight,
//! so both GPUs' copies overlap.

use std::future::{Future, poll_fn};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::Poll;

use futures::FutureExt;
use futures::future::{BoxFuture, Either, ready, select};
use futures::stream::{FuturesOrdered, StreamExt};
use tp_channel::ChannelError;
use tp_channel::kit::le_bytes;
use tp_transport::{BoxConnection, Connection, TransportError};

use super::region::{self, Region, TOKEN_LEN};
use crate::buffer::Gpu;
use crate::driver;

/// The most slots a peer may offer.
pub const MAX_SLOTS: u32 = 64;
/// The largest slot a peer may offer (and a multiple of 4096 it must be).
pub const MAX_SLOT_LEN: u64 = 64 << 20;
/// The longest host identity in an offer.
pub const MAX_HOST: usize = 128;

/// Release byte: the receiver is done with the slot.
const RELEASED: u8 = 0;
/// Answer byte: this side mapped the peer's outbox.
const MAPPED: u8 = 0;
/// Answer byte: it did not (the reason is in this side's log).
const NOT_MAPPED: u8 = 1;

/// What one side of a cuda_basic channel says at setup on the first staging connection
/// (docs/wire.md §9).
///
/// Byte by byte, little-endian: a kind byte; `0` (offer) continues `pid u32 | fd u32 |
/// slots u32 | slot_len u64 | token [16] | host length u8 | host (UTF-8)`; `1` (none)
/// ends there. Nothing else may follow.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum StagingSetup {
    /// "Map my outbox": where it is and what it holds.
    Offer(StagingOffer),
    /// No outbox (staging disabled, or creating it failed): chunks go over the CPU
    /// channel.
    None,
}

/// Where a side's outbox is: see [`StagingSetup`].
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct StagingOffer {
    /// `<boot id>/<pid namespace>`: a peer elsewhere does not try to open the fd.
    pub host: String,
    /// The offering process, as its pid namespace numbers it.
    pub pid: u32,
    /// The memfd's number in that process.
    pub fd: u32,
    /// How many slots (1..=[`MAX_SLOTS`]).
    pub slots: u32,
    /// Bytes per slot (4096..=[`MAX_SLOT_LEN`], a multiple of 4096).
    pub slot_len: u64,
    /// What the segment's first 16 bytes hold.
    pub token: [u8; TOKEN_LEN],
}

impl StagingSetup {
    const OFFER: u8 = 0;
    const NONE: u8 = 1;
    /// Bytes of an offer before its host.
    const FIXED: usize = 1 + 4 + 4 + 4 + 8 + TOKEN_LEN + 1;
    /// The longest encoding: the limit a side reads the peer's frame under.
    pub const MAX_LEN: u64 = (Self::FIXED + MAX_HOST) as u64;

    /// The bytes. A host longer than [`MAX_HOST`] bytes is cut at a character boundary
    /// (the peer then finds it differs and does not map).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Offer(o) => {
                let mut end = o.host.len().min(MAX_HOST);
                while !o.host.is_char_boundary(end) {
                    end -= 1;
                }
                let host = &o.host.as_bytes()[..end];
                let mut d = Vec::with_capacity(Self::FIXED + host.len());
                d.push(Self::OFFER);
                d.extend_from_slice(&o.pid.to_le_bytes());
                d.extend_from_slice(&o.fd.to_le_bytes());
                d.extend_from_slice(&o.slots.to_le_bytes());
                d.extend_from_slice(&o.slot_len.to_le_bytes());
                d.extend_from_slice(&o.token);
                d.push(host.len() as u8);
                d.extend_from_slice(host);
                d
            }
            Self::None => vec![Self::NONE],
        }
    }

    /// Parses a peer's setup.
    ///
    /// # Errors
    /// [`ChannelError::Protocol`]: empty, an unknown kind, truncated, trailing bytes,
    /// slots or a slot size out of range, or a host that is not UTF-8 or too long.
    pub fn decode(d: &[u8]) -> Result<Self, ChannelError> {
        match d.first() {
            Some(&Self::NONE) if d.len() == 1 => Ok(Self::None),
            Some(&Self::OFFER) => {
                let b = &d[1..];
                let pid = u32::from_le_bytes(le_bytes(b, 0)?);
                let fd = u32::from_le_bytes(le_bytes(b, 4)?);
                let slots = u32::from_le_bytes(le_bytes(b, 8)?);
                let slot_len = u64::from_le_bytes(le_bytes(b, 12)?);
                let token = le_bytes::<TOKEN_LEN>(b, 20)?;
                let [host_len] = le_bytes::<1>(b, 20 + TOKEN_LEN)?;
                let host = &d[Self::FIXED..];
                if host.len() != usize::from(host_len) || host.len() > MAX_HOST {
                    return Err(ChannelError::protocol(
                        "cuda_basic: staging setup of the wrong size",
                    ));
                }
                if !(1..=MAX_SLOTS).contains(&slots)
                    || !(4096..=MAX_SLOT_LEN).contains(&slot_len)
                    || !slot_len.is_multiple_of(4096)
                {
                    return Err(ChannelError::protocol(format!(
                        "cuda_basic: {slots} staging slots of {slot_len} bytes"
                    )));
                }
                let host = std::str::from_utf8(host)
                    .map_err(|_| ChannelError::protocol("cuda_basic: host is not UTF-8"))?;
                Ok(Self::Offer(StagingOffer {
                    host: host.to_string(),
                    pid,
                    fd,
                    slots,
                    slot_len,
                    token,
                }))
            }
            _ => Err(ChannelError::protocol("cuda_basic: bad staging setup")),
        }
    }
}

/// This machine and pid namespace, as offers name it.
fn host() -> Result<String, String> {
    Ok(format!(
        "{}/{}",
        tp_channel::kit::boot_id()?,
        tp_channel::kit::namespace("pid")?
    ))
}

fn token() -> Result<[u8; TOKEN_LEN], String> {
    use std::io::Read;
    let mut t = [0u8; TOKEN_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut t))
        .map_err(|e| format!("read /dev/urandom: {e}"))?;
    Ok(t)
}

/// Our outbox and the offer describing it.
fn outbox(slots: u32, slot_len: usize, gpu: Option<u32>) -> Result<(Region, StagingOffer), String> {
    let token = token()?;
    let region = Region::create(slots, slot_len, token, gpu)?;
    let offer = StagingOffer {
        host: host()?,
        pid: std::process::id(),
        fd: u32::try_from(region.fd().as_raw_fd()).map_err(|_| "negative fd")?,
        slots,
        slot_len: slot_len as u64,
        token,
    };
    Ok((region, offer))
}

/// Maps the outbox a peer offered.
fn inbox(offer: &StagingOffer, gpu: Option<u32>) -> Result<Region, String> {
    use rustix::fs::{Mode, OFlags};
    let here = host()?;
    if offer.host != here {
        return Err(format!("the peer is on {}, this is {here}", offer.host));
    }
    let path = format!("/proc/{}/fd/{}", offer.pid, offer.fd);
    // Non-blocking and no controlling terminal: whatever the path turns out to be, the
    // open returns at once and has no side effect; `Region::open` then insists on a
    // sealed regular file of the offered size and token.
    let fd = rustix::fs::open(
        path.as_str(),
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {path}: {e}"))?;
    let slot_len = usize::try_from(offer.slot_len).map_err(|_| "slot too large")?;
    Region::open(fd, offer.slots, slot_len, offer.token, gpu)
}

/// What a side asks of staging: `slots` slots of `slot_len` bytes (0 slots: none),
/// registered with GPU `gpu` (`None`: host copies only, as in tests without a GPU).
#[derive(Clone, Copy, Debug)]
pub(super) struct Want {
    pub(super) slots: u32,
    pub(super) slot_len: usize,
    pub(super) gpu: Option<u32>,
}

/// Shared staging, set up by the channel's first operation (so that a channel that
/// never carries a GPU tensor pins no memory): both ends' first operations meet in the
/// setup, whichever they are.
pub(super) struct LazyStaging {
    conns: [Arc<dyn Connection>; 2],
    want: Want,
    /// Held while the setup runs; `true` once it was tried.
    tried: futures::lock::Mutex<bool>,
    staging: OnceLock<Option<Staging>>,
}

impl std::fmt::Debug for LazyStaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyStaging")
            .field("staging", &self.staging.get())
            .finish_non_exhaustive()
    }
}

impl LazyStaging {
    /// Staging over the channel's two staging connections, as `want` asks.
    pub(super) fn new(conns: [BoxConnection; 2], want: Want) -> Self {
        Self {
            conns: conns.map(Arc::from),
            want,
            tried: futures::lock::Mutex::new(false),
            staging: OnceLock::new(),
        }
    }

    /// The staging (set up now if this is the first call): `None` when the channel
    /// stages through its CPU channel.
    ///
    /// # Errors
    /// The setup failed, now or at an earlier call.
    pub(super) async fn get(&self) -> Result<Option<&Staging>, ChannelError> {
        if let Some(s) = self.staging.get() {
            return Ok(s.as_ref());
        }
        let mut tried = self.tried.lock().await;
        if let Some(s) = self.staging.get() {
            return Ok(s.as_ref());
        }
        if *tried {
            return Err(ChannelError::protocol(
                "cuda_basic: the staging setup failed earlier",
            ));
        }
        *tried = true;
        let [a, b] = &self.conns;
        let mut guard = Abandoned(Some([a, b]));
        let s = negotiate(self.conns.clone(), self.want).await;
        guard.0 = None;
        let s = s?;
        Ok(self.staging.get_or_init(|| s).as_ref())
    }

    /// Closes the staging connections: a setup or transfer waiting on them fails.
    pub(super) fn close(&self) {
        for c in &self.conns {
            c.close();
        }
    }
}

/// Runs the setup over the two staging connections: `Some` when both sides mapped each
/// other's outbox, `None` when the channel stages through its CPU channel instead.
///
/// # Errors
/// A connection failed or the peer's setup is malformed.
pub(super) async fn negotiate(
    conns: [Arc<dyn Connection>; 2],
    want: Want,
) -> Result<Option<Staging>, ChannelError> {
    let [notes, releases] = conns;
    let ours = match want.slots {
        0 => Err("disabled".to_string()),
        slots => outbox(slots, want.slot_len, want.gpu),
    };
    let setup = match &ours {
        Ok((_, offer)) => StagingSetup::Offer(offer.clone()),
        Err(_) => StagingSetup::None,
    };
    notes.write_frame(&setup.encode()).await?;
    let theirs = StagingSetup::decode(&notes.read_frame(StagingSetup::MAX_LEN).await?)?;
    let mapped = match &theirs {
        StagingSetup::Offer(offer) => inbox(offer, want.gpu),
        StagingSetup::None => Err("the peer offers no outbox".to_string()),
    };
    let answer = if mapped.is_ok() { MAPPED } else { NOT_MAPPED };
    releases.write(&[&[answer]]).await?;
    let mut their_answer = [0u8];
    releases.read_exact(&mut their_answer).await?;
    match (ours, mapped, their_answer) {
        (Ok((outbox, _)), Ok(inbox), [MAPPED]) => {
            tracing::debug!(
                channel = "cuda_basic",
                slots = outbox.slots(),
                slot_len = outbox.slot_len(),
                peer_slots = inbox.slots(),
                peer_slot_len = inbox.slot_len(),
                registered = outbox.registered(),
                "staging through shared memory"
            );
            Ok(Some(Staging {
                outbox,
                inbox,
                notes,
                releases,
                send: Mutex::new(Some(SendState::default())),
                recv: Mutex::new(Some(0)),
            }))
        }
        (ours, mapped, [answer]) => {
            let why = match (ours.err(), mapped.err()) {
                (Some(e), _) => format!("no outbox here: {e}"),
                (None, Some(e)) => format!("cannot map the peer's outbox: {e}"),
                (None, None) if answer == NOT_MAPPED => {
                    "the peer cannot map this side's outbox".to_string()
                }
                (None, None) => {
                    return Err(ChannelError::protocol("cuda_basic: bad staging answer"));
                }
            };
            tracing::debug!(
                channel = "cuda_basic",
                why,
                "staging through the CPU channel"
            );
            notes.close();
            releases.close();
            Ok(None)
        }
    }
}

/// A read kept across polls and operations: a future that reads `N` bytes, stored
/// until it completes, so that giving up on waiting for it never loses bytes.
type Pending<const N: usize> = Option<BoxFuture<'static, Result<[u8; N], TransportError>>>;

/// Reads the next `N` bytes of `conn`, resuming the read `pending` holds if any.
fn next_read<'a, const N: usize>(
    pending: &'a mut Pending<N>,
    conn: &'a Arc<dyn Connection>,
) -> impl Future<Output = Result<[u8; N], TransportError>> + Unpin + 'a {
    poll_fn(move |cx| {
        let read = pending.get_or_insert_with(|| {
            let conn = conn.clone();
            async move {
                let mut b = [0u8; N];
                conn.read_exact(&mut b).await.map(|()| b)
            }
            .boxed()
        });
        let r = std::task::ready!(read.as_mut().poll(cx));
        *pending = None;
        Poll::Ready(r)
    })
}

/// Where a send's bytes are.
pub(super) enum Src<'a> {
    Gpu(Gpu),
    Cpu(&'a [u8]),
}

/// Where a receive's bytes go.
pub(super) enum Dst<'a> {
    Gpu(Gpu),
    Cpu(&'a mut [u8]),
}

#[derive(Default)]
struct SendState {
    /// Chunks announced on this direction so far.
    seq: u64,
    /// Of those, released by the peer.
    released: u64,
    /// A release read under way.
    pending: Pending<1>,
}

/// Both directions' staging of one channel.
pub(super) struct Staging {
    outbox: Region,
    inbox: Region,
    notes: Arc<dyn Connection>,
    releases: Arc<dyn Connection>,
    /// Taken by the send under way (sends run one at a time); gone if one was
    /// abandoned half way, after which sends fail.
    send: Mutex<Option<SendState>>,
    /// Chunks received so far, likewise.
    recv: Mutex<Option<u64>>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("outbox", &self.outbox)
            .field("inbox", &self.inbox)
            .finish_non_exhaustive()
    }
}

/// A GPU copy's end, or a host copy's (done already).
type Copied = BoxFuture<'static, Result<(), ChannelError>>;

/// Enqueues a copy of `len` bytes on `g`'s stream and returns its end.
fn gpu_copy(g: Gpu, dst: u64, src: u64, len: usize) -> Result<Copied, ChannelError> {
    driver::copy_async(g.device, dst, src, len, g.stream)?;
    let done = driver::finished(g.device, g.stream)?;
    Ok(async move { done.await.map_err(ChannelError::from) }.boxed())
}

/// Waits out the copies a failed operation left enqueued: the GPU must be done with the
/// slots (and the caller's buffer) before the operation returns, since a channel that
/// failed may be dropped next, unregistering and unmapping the slots.
async fn settle(mut copies: FuturesOrdered<Copied>) {
    while copies.next().await.is_some() {}
}

fn short() -> ChannelError {
    ChannelError::protocol("cuda_basic: a buffer shorter than its length")
}

/// Armed while the setup or an operation runs: dropped armed (its future was dropped
/// half way), it closes the staging connections. The two ends are then apart for good
/// (a setup half done, chunk counts that differ), so nothing more may move, and the
/// peer fails at once instead of waiting for frames, chunks or releases that never
/// come. (Copies an abandoned operation left on a GPU stream are not waited for: no
/// waiting in a drop.)
struct Abandoned<'a>(Option<[&'a Arc<dyn Connection>; 2]>);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        for conn in self.0.iter().flatten() {
            conn.close();
        }
    }
}

fn abandoned() -> ChannelError {
    ChannelError::protocol("cuda_basic: an earlier operation was abandoned half way")
}

impl Staging {
    /// Starts an operation on the direction state `slot` holds: takes the state for
    /// the operation's life (gone for good if the operation is abandoned, see
    /// [`Abandoned`], whose armed guard comes with it).
    fn begin<S>(&self, slot: &Mutex<Option<S>>) -> Result<(S, Abandoned<'_>), ChannelError> {
        let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        let state = taken.ok_or_else(abandoned)?;
        Ok((state, Abandoned(Some([&self.notes, &self.releases]))))
    }

    /// Ends an operation [`Staging::begin`] started, with its result `r`: puts the
    /// state back when it succeeded; a failed one waits out the copies it enqueued.
    async fn end<S>(
        slot: &Mutex<Option<S>>,
        (state, mut guard): (S, Abandoned<'_>),
        copies: FuturesOrdered<Copied>,
        r: Result<(), ChannelError>,
    ) -> Result<(), ChannelError> {
        guard.0 = None;
        if let Err(e) = r {
            settle(copies).await;
            return Err(e);
        }
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(state);
        Ok(())
    }

    /// Stages `len` bytes from `src` into our outbox, chunk by chunk.
    pub(super) async fn send(&self, src: Src<'_>, len: usize) -> Result<(), ChannelError> {
        let (mut st, guard) = self.begin(&self.send)?;
        let mut copies = FuturesOrdered::new();
        let r = self.send_chunks(&mut st, &src, len, &mut copies).await;
        Self::end(&self.send, (st, guard), copies, r).await
    }

    async fn send_chunks(
        &self,
        st: &mut SendState,
        src: &Src<'_>,
        len: usize,
        copies: &mut FuturesOrdered<Copied>,
    ) -> Result<(), ChannelError> {
        let slot = self.outbox.slot_len();
        let slots = u64::from(self.outbox.slots());
        let count = len.div_ceil(slot) as u64;
        let chunk_len = |i: u64| slot.min(len - i as usize * slot);
        let (mut queued, mut announced) = (0u64, 0u64);
        while announced < count {
            while queued < count && st.seq + queued - st.released < slots {
                let (off, n) = (queued as usize * slot, chunk_len(queued));
                let seq = st.seq + queued;
                let copied = match src {
                    Src::Gpu(g) => {
                        gpu_copy(*g, self.outbox.slot_addr(seq), g.addr + off as u64, n)?
                    }
                    Src::Cpu(b) => {
                        let part = b.get(off..off + n).ok_or_else(short)?;
                        self.outbox.write(seq, part)?;
                        ready(Ok(())).boxed()
                    }
                };
                copies.push_back(copied);
                queued += 1;
            }
            let copied = if copies.is_empty() {
                // Every slot is the peer's: wait for one back.
                None
            } else if queued < count {
                // A copy's end or a slot back, whichever comes first; an unfinished
                // read stays in `st.pending` for the next turn.
                let first =
                    match select(copies.next(), next_read(&mut st.pending, &self.releases)).await {
                        Either::Left((copied, _)) => Ok(copied),
                        Either::Right((r, _)) => Err(r),
                    };
                match first {
                    Ok(copied) => copied,
                    Err(r) => {
                        Self::released(st, r?, announced)?;
                        continue;
                    }
                }
            } else {
                copies.next().await
            };
            let Some(copied) = copied else {
                let r = next_read(&mut st.pending, &self.releases).await;
                Self::released(st, r?, announced)?;
                continue;
            };
            copied?;
            let n = chunk_len(announced) as u32;
            self.notes.write(&[&n.to_le_bytes()]).await?;
            announced += 1;
        }
        st.seq += count;
        Ok(())
    }

    /// A release byte arrived while `announced` chunks of this send were announced.
    fn released(st: &mut SendState, [byte]: [u8; 1], announced: u64) -> Result<(), ChannelError> {
        if byte != RELEASED {
            return Err(ChannelError::protocol("cuda_basic: bad release byte"));
        }
        if st.released >= st.seq + announced {
            return Err(ChannelError::protocol(
                "cuda_basic: a release of a chunk never announced",
            ));
        }
        st.released += 1;
        Ok(())
    }

    /// Copies `len` bytes into `dst` out of the peer's outbox, chunk by chunk.
    pub(super) async fn recv(&self, mut dst: Dst<'_>, len: usize) -> Result<(), ChannelError> {
        let (mut seq, guard) = self.begin(&self.recv)?;
        let mut copies = FuturesOrdered::new();
        let r = self.recv_chunks(&mut seq, &mut dst, len, &mut copies).await;
        Self::end(&self.recv, (seq, guard), copies, r).await
    }

    async fn recv_chunks(
        &self,
        seq: &mut u64,
        dst: &mut Dst<'_>,
        len: usize,
        copies: &mut FuturesOrdered<Copied>,
    ) -> Result<(), ChannelError> {
        let slot = self.inbox.slot_len();
        let count = len.div_ceil(slot) as u64;
        let mut notice: Pending<4> = None;
        let (mut announced, mut released) = (0u64, 0u64);
        while released < count {
            let copied = if announced == count {
                copies.next().await
            } else if copies.is_empty() {
                None
            } else {
                let first = match select(copies.next(), next_read(&mut notice, &self.notes)).await {
                    Either::Left((copied, _)) => Ok(copied),
                    Either::Right((r, _)) => Err(r),
                };
                match first {
                    Ok(copied) => copied,
                    Err(r) => {
                        copies.push_back(self.land(dst, *seq + announced, announced, r?, len)?);
                        announced += 1;
                        continue;
                    }
                }
            };
            let Some(copied) = copied else {
                let r = next_read(&mut notice, &self.notes).await;
                copies.push_back(self.land(dst, *seq + announced, announced, r?, len)?);
                announced += 1;
                continue;
            };
            copied?;
            self.releases.write(&[&[RELEASED]]).await?;
            released += 1;
        }
        *seq += count;
        Ok(())
    }

    /// Chunk `index` of the receive (chunk `seq` of the direction) was announced with
    /// `notice`: starts copying it out of its slot.
    fn land(
        &self,
        dst: &mut Dst<'_>,
        seq: u64,
        index: u64,
        notice: [u8; 4],
        len: usize,
    ) -> Result<Copied, ChannelError> {
        let slot = self.inbox.slot_len();
        let off = index as usize * slot;
        let n = slot.min(len - off);
        let announced = u32::from_le_bytes(notice) as usize;
        if announced != n {
            return Err(ChannelError::protocol(format!(
                "cuda_basic: chunk {index} announced with {announced} bytes, expected {n}"
            )));
        }
        match dst {
            Dst::Gpu(g) => gpu_copy(*g, g.addr + off as u64, self.inbox.slot_addr(seq), n),
            Dst::Cpu(b) => {
                let part = b.get_mut(off..off + n).ok_or_else(short)?;
                self.inbox.read(seq, part)?;
                Ok(ready(Ok(())).boxed())
            }
        }
    }
}

/// The slots' length as [`region`] lays them out, for the context's checks.
pub(super) fn fits(slots: u32, slot_len: usize) -> bool {
    slots <= MAX_SLOTS
        && (slots == 0
            || (slot_len >= 4096
                && slot_len as u64 <= MAX_SLOT_LEN
                && slot_len.is_multiple_of(4096)
                && region::region_len(slots, slot_len).is_some()))
}

#[cfg(test)]
pub(super) mod tests {
    use futures::executor::block_on;
    use futures::future::join;
    use tp_transport::Transport;
    use tp_transport::shm::ShmTransport;
    use tp_transport::tcp::TcpTransport;

    use super::*;

    /// Two pairs of connected connections (`[a0, a1]`, `[b0, b1]`).
    pub(in crate::basic) async fn conns(shm: bool) -> ([BoxConnection; 2], [BoxConnection; 2]) {
        let t: Box<dyn Transport> = if shm {
            Box::new(ShmTransport::default())
        } else {
            Box::new(TcpTransport::new())
        };
        let l = t.listen(if shm { "" } else { "127.0.0.1:0" }).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let (c, s) = join(t.connect(l.address()), l.accept()).await;
            a.push(c.unwrap());
            b.push(s.unwrap());
        }
        let pair = |v: Vec<BoxConnection>| -> [BoxConnection; 2] { v.try_into().unwrap() };
        (pair(a), pair(b))
    }

    fn want(slots: u32, slot_len: usize) -> Want {
        Want {
            slots,
            slot_len,
            gpu: None,
        }
    }

    async fn staged(shm: bool, a: Want, b: Want) -> (Option<Staging>, Option<Staging>) {
        let (ca, cb) = conns(shm).await;
        let (sa, sb) = join(
            negotiate(ca.map(Arc::from), a),
            negotiate(cb.map(Arc::from), b),
        )
        .await;
        (sa.unwrap(), sb.unwrap())
    }

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
            .collect()
    }

    async fn send_all(from: &Staging, lens: &[usize], salt: u8) {
        for (i, &len) in lens.iter().enumerate() {
            let bytes = pattern(len, salt.wrapping_add(i as u8));
            from.send(Src::Cpu(&bytes), len).await.unwrap();
        }
    }

    async fn recv_all(to: &Staging, lens: &[usize], salt: u8) {
        for (i, &len) in lens.iter().enumerate() {
            let mut got = vec![0u8; len];
            to.recv(Dst::Cpu(&mut got), len).await.unwrap();
            assert_eq!(got, pattern(len, salt.wrapping_add(i as u8)), "len {len}");
        }
    }

    #[test]
    fn setup_round_trips_and_rejects_what_it_must() {
        let offer = StagingOffer {
            host: "boot/pid:[1]".into(),
            pid: 42,
            fd: 7,
            slots: 4,
            slot_len: 2 << 20,
            token: [9; TOKEN_LEN],
        };
        for s in [StagingSetup::Offer(offer.clone()), StagingSetup::None] {
            let bytes = s.encode();
            assert!(bytes.len() as u64 <= StagingSetup::MAX_LEN);
            assert_eq!(StagingSetup::decode(&bytes).unwrap(), s);
        }
        // A host too long is cut, never inside a character: it still decodes.
        let long = StagingOffer {
            host: format!("{}é", "h".repeat(MAX_HOST - 1)),
            ..offer
        };
        match StagingSetup::decode(&StagingSetup::Offer(long).encode()).unwrap() {
            StagingSetup::Offer(o) => assert_eq!(o.host, "h".repeat(MAX_HOST - 1)),
            StagingSetup::None => panic!("an offer decoded as none"),
        }
        let good = StagingSetup::Offer(offer.clone()).encode();
        let bad = |o: StagingOffer| StagingSetup::decode(&StagingSetup::Offer(o).encode());
        assert!(
            bad(StagingOffer {
                slots: 0,
                ..offer.clone()
            })
            .is_err()
        );
        assert!(
            bad(StagingOffer {
                slots: MAX_SLOTS + 1,
                ..offer.clone()
            })
            .is_err()
        );
        assert!(
            bad(StagingOffer {
                slot_len: 4095,
                ..offer.clone()
            })
            .is_err()
        );
        assert!(
            bad(StagingOffer {
                slot_len: 8192 + 1,
                ..offer.clone()
            })
            .is_err()
        );
        assert!(
            bad(StagingOffer {
                slot_len: MAX_SLOT_LEN + 4096,
                ..offer
            })
            .is_err()
        );
        for cut in 0..good.len() {
            assert!(StagingSetup::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(StagingSetup::decode(&[good.as_slice(), &[0]].concat()).is_err());
        assert!(StagingSetup::decode(&[1, 0]).is_err());
        assert!(StagingSetup::decode(&[2]).is_err());
    }

    #[test]
    fn both_ends_stage_through_shared_memory_in_one_process() {
        for shm in [true, false] {
            let (a, b) = block_on(staged(shm, want(2, 4096), want(3, 8192)));
            let (a, b) = (a.expect("a staged"), b.expect("b staged"));
            assert_eq!((a.outbox.slots(), a.inbox.slots()), (2, 3));
            assert_eq!((b.outbox.slot_len(), b.inbox.slot_len()), (8192, 4096));
            // Lengths around the slot sizes, several tensors back to back, both
            // directions at once: more chunks than slots, so the sender waits for
            // releases, and sequence numbers run on across tensors.
            let lens = [0, 1, 4095, 4096, 4097, 8192, 8193, 10 * 4096 + 7, 3];
            block_on(async {
                join(
                    join(send_all(&a, &lens, 1), recv_all(&b, &lens, 1)),
                    join(send_all(&b, &lens, 100), recv_all(&a, &lens, 100)),
                )
                .await
            });
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Any slot layouts on the two sides, any run of tensor lengths each way,
        /// both directions at once, over either transport: every byte arrives, in
        /// order, and the slots are reused as the sequence runs on.
        #[test]
        fn any_layouts_and_lengths_arrive_intact(
            shm in proptest::prelude::any::<bool>(),
            (slots_a, pages_a) in (1u32..=4, 1usize..=3),
            (slots_b, pages_b) in (1u32..=4, 1usize..=3),
            a_to_b in proptest::collection::vec(0usize..40_000, 0..6),
            b_to_a in proptest::collection::vec(0usize..40_000, 0..6),
            salt in proptest::prelude::any::<u8>(),
        ) {
            let (a, b) = block_on(staged(
                shm,
                want(slots_a, pages_a * 4096),
                want(slots_b, pages_b * 4096),
            ));
            let (a, b) = (a.expect("a staged"), b.expect("b staged"));
            block_on(async {
                join(
                    join(send_all(&a, &a_to_b, salt), recv_all(&b, &a_to_b, salt)),
                    join(
                        send_all(&b, &b_to_a, salt ^ 0x55),
                        recv_all(&a, &b_to_a, salt ^ 0x55),
                    ),
                )
                .await
            });
        }
    }

    #[test]
    fn a_sender_runs_ahead_by_its_slots_only() {
        let (a, b) = block_on(staged(true, want(2, 4096), want(2, 4096)));
        let (a, b) = (a.unwrap(), b.unwrap());
        // Two slots' worth is staged without the receiver...
        let small = pattern(2 * 4096, 5);
        block_on(a.send(Src::Cpu(&small), small.len())).unwrap();
        // ...but a third chunk needs a release: the send is still waiting.
        let more = pattern(4096, 6);
        let mut third = Box::pin(a.send(Src::Cpu(&more), more.len()));
        assert!(third.as_mut().now_or_never().is_none());
        block_on(async {
            let mut got = vec![0u8; small.len()];
            let (sent, received) = join(third, b.recv(Dst::Cpu(&mut got), small.len())).await;
            sent.unwrap();
            received.unwrap();
            assert_eq!(got, small);
            let mut got = vec![0u8; more.len()];
            b.recv(Dst::Cpu(&mut got), more.len()).await.unwrap();
            assert_eq!(got, more);
        });
    }

    #[test]
    fn either_side_declining_falls_back_on_both() {
        let (a, b) = block_on(staged(true, want(0, 4096), want(2, 4096)));
        assert!(a.is_none() && b.is_none());
        let (a, b) = block_on(staged(false, want(2, 4096), want(0, 4096)));
        assert!(a.is_none() && b.is_none());
    }

    #[test]
    fn an_offer_from_elsewhere_or_of_the_wrong_memory_is_not_mapped() {
        let (region, offer) = outbox(1, 4096, None).unwrap();
        assert!(inbox(&offer, None).is_ok());
        let elsewhere = StagingOffer {
            host: "another-boot/pid:[1]".into(),
            ..offer
        };
        assert!(
            inbox(&elsewhere, None)
                .unwrap_err()
                .contains("the peer is on")
        );
        let wrong_token = StagingOffer {
            token: [0; TOKEN_LEN],
            ..offer.clone()
        };
        assert!(inbox(&wrong_token, None).unwrap_err().contains("token"));
        let wrong_size = StagingOffer {
            slots: 2,
            ..offer.clone()
        };
        assert!(inbox(&wrong_size, None).unwrap_err().contains("bytes"));
        // Another file of ours: not a sealed memfd.
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let not_memfd = StagingOffer {
            fd: u32::try_from(file.as_raw_fd()).unwrap(),
            ..offer.clone()
        };
        assert!(inbox(&not_memfd, None).is_err());
        let no_such_fd = StagingOffer {
            fd: 1 << 30,
            ..offer
        };
        assert!(inbox(&no_such_fd, None).unwrap_err().contains("open"));
        drop(region);
    }

    #[test]
    fn a_wrong_chunk_length_is_a_protocol_error() {
        let (a, b) = block_on(staged(true, want(2, 4096), want(2, 4096)));
        let (a, b) = (a.unwrap(), b.unwrap());
        let bytes = pattern(5000, 1);
        block_on(a.send(Src::Cpu(&bytes), bytes.len())).unwrap();
        let mut got = vec![0u8; 4000];
        let err = block_on(b.recv(Dst::Cpu(&mut got), 4000)).unwrap_err();
        assert!(
            err.to_string().contains("announced with 4096 bytes"),
            "{err}"
        );
        // The receive state went with the failed receive: the channel is broken.
        assert!(block_on(b.recv(Dst::Cpu(&mut got), 4000)).is_err());
    }

    /// Releases are counted against announcements: a peer's stray release byte is
    /// refused instead of letting the count of slots in use run below zero (a sender
    /// reads releases while its GPU copies run, so strays can come at any time).
    #[test]
    fn a_release_of_a_chunk_never_announced_is_a_protocol_error() {
        let mut st = SendState {
            seq: 5,
            released: 4,
            pending: None,
        };
        Staging::released(&mut st, [RELEASED], 0).unwrap();
        assert_eq!(st.released, 5);
        let err = Staging::released(&mut st, [RELEASED], 0).unwrap_err();
        assert!(err.to_string().contains("never announced"), "{err}");
        Staging::released(&mut st, [RELEASED], 1).unwrap();
        assert!(Staging::released(&mut st, [7], 9).is_err());
    }

    #[test]
    fn an_operation_abandoned_half_way_fails_both_ends_instead_of_hanging() {
        let (a, b) = block_on(staged(true, want(1, 4096), want(1, 4096)));
        let (a, b) = (a.unwrap(), b.unwrap());
        let bytes = pattern(3 * 4096, 4);
        {
            // Staged one chunk, then waits for a release: dropped there.
            let mut send = Box::pin(a.send(Src::Cpu(&bytes), bytes.len()));
            assert!(send.as_mut().now_or_never().is_none());
        }
        let mut got = vec![0u8; bytes.len()];
        assert!(block_on(b.recv(Dst::Cpu(&mut got), bytes.len())).is_err());
        let err = block_on(a.send(Src::Cpu(&bytes), bytes.len())).unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
    }

    #[test]
    fn a_setup_abandoned_half_way_fails_the_peer_instead_of_hanging() {
        let (ca, cb) = block_on(conns(true));
        let (a, b) = (
            LazyStaging::new(ca, want(1, 4096)),
            LazyStaging::new(cb, want(1, 4096)),
        );
        {
            // Wrote its offer, waits for the peer's: dropped there.
            let mut setup = Box::pin(a.get());
            assert!(setup.as_mut().now_or_never().is_none());
        }
        assert!(block_on(b.get()).is_err());
        assert!(block_on(a.get()).is_err());
    }

    #[test]
    fn a_peer_that_goes_away_fails_waiting_operations() {
        let (a, b) = block_on(staged(false, want(1, 4096), want(1, 4096)));
        let (a, b) = (a.unwrap(), b.unwrap());
        let bytes = pattern(3 * 4096, 2);
        let mut got = vec![0u8; 4096];
        block_on(async {
            // A send that needs releases, and a receive that waits for a notice.
            let sending = a.send(Src::Cpu(&bytes), bytes.len());
            let receiving = a.recv(Dst::Cpu(&mut got), 4096);
            b.notes.close();
            b.releases.close();
            drop(b);
            let (s, r) = join(sending, receiving).await;
            assert!(s.is_err() && r.is_err());
        });
    }

    /// Set in the peer process of `stages_between_two_processes`: the address to dial.
    const PEER: &str = "TP_CUDA_BASIC_STAGING_PEER";

    const CROSS_LENS: [usize; 6] = [0, 1, 4096, 3 * 4096 + 5, 1 << 20, 64];

    async fn numbered(conns: Vec<(u64, BoxConnection)>) -> [BoxConnection; 2] {
        let mut v: Vec<Option<BoxConnection>> = vec![None, None];
        for (i, c) in conns {
            v[i as usize] = Some(c);
        }
        v.into_iter()
            .map(Option::unwrap)
            .collect::<Vec<_>>()
            .try_into()
            .unwrap()
    }

    async fn cross_peer(addr: String) {
        let t = ShmTransport::default();
        let mut conns = Vec::new();
        for i in 0..2u64 {
            let c = t.connect(&addr).await.unwrap();
            c.write(&[&i.to_le_bytes()]).await.unwrap();
            conns.push((i, c));
        }
        let staging = negotiate(numbered(conns).await.map(Arc::from), want(2, 8192))
            .await
            .unwrap()
            .expect("the peer process maps the parent's outbox");
        for len in CROSS_LENS {
            let mut got = vec![0u8; len];
            staging.recv(Dst::Cpu(&mut got), len).await.unwrap();
            staging.send(Src::Cpu(&got), len).await.unwrap();
        }
    }

    /// Shared staging across two processes (this test binary runs itself again as the
    /// peer, which maps this process's outbox through /proc and echoes every tensor).
    #[test]
    fn stages_between_two_processes() {
        if let Ok(addr) = std::env::var(PEER) {
            block_on(cross_peer(addr));
            return;
        }
        let t = ShmTransport::default();
        let l = t.listen("").unwrap();
        let mut peer = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "basic::staging::tests::stages_between_two_processes",
                "--exact",
                "--nocapture",
            ])
            .env(PEER, l.address())
            .spawn()
            .unwrap();
        block_on(async {
            let mut conns = Vec::new();
            for _ in 0..2 {
                let c = l.accept().await.unwrap();
                let mut i = [0u8; 8];
                c.read_exact(&mut i).await.unwrap();
                conns.push((u64::from_le_bytes(i), c));
            }
            let staging = negotiate(numbered(conns).await.map(Arc::from), want(3, 4096))
                .await
                .unwrap()
                .expect("this process maps the peer's outbox");
            assert_ne!(staging.inbox.slot_len(), staging.outbox.slot_len());
            for (i, len) in CROSS_LENS.into_iter().enumerate() {
                let sent = pattern(len, i as u8);
                staging.send(Src::Cpu(&sent), len).await.unwrap();
                let mut echo = vec![0u8; len];
                staging.recv(Dst::Cpu(&mut echo), len).await.unwrap();
                assert_eq!(echo, sent, "len {len}");
            }
        });
        assert!(peer.wait().unwrap().success(), "the peer process failed");
    }
}
