//! A lock-free single-producer single-consumer byte ring over a shared region.
//!
//! Sans-IO and `core`-only: the ring is a [`RingHeader`] of atomics and `u64` markers
//! followed by `capacity` data bytes, all addressed by offsets inside one byte region. No
//! pointer is ever stored in the region, so each process maps it wherever it likes. The
//! pointer-holding views, [`Producer`] and [`Consumer`], stay process-local.
//!
//! # Layout (offsets from the start of the region)
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0 | `magic: u64` = [`RING_MAGIC`] (published last, with Release) | creator |
//! | 8 | `capacity: u64`, a power of two | creator |
//! | 64 | `head: u64`, bytes ever written | producer |
//! | 72 | `producer_parked: u32` | producer |
//! | 76 | `producer_closed: u32` | producer |
//! | 128 | `tail: u64`, bytes ever read | consumer |
//! | 192 | `consumer_parked: u32` | consumer |
//! | 196 | `consumer_closed: u32` | consumer |
//! | 256 | data, `capacity` bytes; byte `n` of the stream lives at `n % capacity` | |
//!
//! `head` and `tail` never wrap (2^64 bytes is centuries at memory speed); `head - tail`
//! is the number of readable bytes and is at most `capacity`.
//!
//! Each 64-byte line is laid out by who writes it and how often the other side reads it.
//! The consumer's flags sit on a line of their own, away from `tail`: the producer reads
//! them after every write, and were they beside `tail`, every write would pull the
//! consumer's line into a shared state, so that the consumer's next `tail` store waited
//! for the line to come back across cores — on the path of every message. (Measured:
//! an 8 B pipe round trip over shm fell from 1.75–1.80 µs to 1.65–1.69 µs.) The
//! producer's flags can stay beside `head`: the consumer reads that line anyway.
//!
//! # Synchronisation
//!
//! - Data: the producer copies bytes into `[head, tail + capacity)` and then stores the
//!   new `head` with Release; the consumer loads `head` with Acquire before reading
//!   `[tail, head)`. Symmetrically the consumer frees space by storing `tail` with
//!   Release, and the producer loads it with Acquire before overwriting. Each byte range
//!   is therefore touched by one side at a time. Space only grows behind the producer's
//!   back, so it may keep using the last `tail` it loaded and load it again only when
//!   that leaves too little room; the consumer's line then stays in the consumer's cache.
//! - Parking: a side that finds nothing to do sets its `*_parked` flag, issues a SeqCst
//!   fence, and checks the marker again before sleeping; the other side publishes its
//!   marker, issues a SeqCst fence, and reads the flag. One of the two always sees the
//!   other (Dekker), so a wake-up is never lost. [`Producer::wake_consumer`] and
//!   [`Consumer::wake_producer`] say whether the peer must be woken (its eventfd written).

use core::cell::Cell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// Written at offset 0 once the ring is initialised ("tpRING\0\x02"; the last byte is
/// the layout's version, so ends built with different layouts refuse each other).
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"tpRING\x00\x02");
/// Size of the header; data starts here.
pub const HEADER_LEN: usize = 256;
/// Lines [`Consumer::prefetch_next`] asks for: a small message (a frame and a few short
/// payloads) fits in two.
pub const PREFETCH_LINES: u64 = 2;

/// The shared header. Only atomics: it may be mapped in several processes at once.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct RingHeader {
    magic: AtomicU64,
    capacity: AtomicU64,
    _pad0: [u64; 6],
    head: AtomicU64,
    producer_parked: AtomicU32,
    producer_closed: AtomicU32,
    _pad1: [u64; 6],
    tail: AtomicU64,
    _pad2: [u64; 7],
    consumer_parked: AtomicU32,
    consumer_closed: AtomicU32,
    _pad3: [u64; 7],
}

const _: () = assert!(size_of::<RingHeader>() == HEADER_LEN);

/// Why a region cannot hold or be read as a ring.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum RingError {
    /// The region is not 64-byte aligned.
    Misaligned,
    /// The capacity is not a power of two of at least 64 bytes.
    BadCapacity(u64),
    /// The region is shorter than header plus capacity.
    TooSmall {
        /// Bytes the ring needs.
        needed: usize,
        /// Bytes the region has.
        actual: usize,
    },
    /// The region does not start with [`RING_MAGIC`] (not a ring, or not initialised).
    BadMagic,
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Misaligned => f.write_str("ring region is not 64-byte aligned"),
            Self::BadCapacity(c) => write!(f, "ring capacity {c} is not a power of two >= 64"),
            Self::TooSmall { needed, actual } => {
                write!(
                    f,
                    "ring region of {actual} bytes is smaller than the {needed} it needs"
                )
            }
            Self::BadMagic => f.write_str("region does not hold an initialised ring"),
        }
    }
}

impl core::error::Error for RingError {}

/// Bytes a region must have for a ring of `capacity` data bytes.
pub const fn region_len(capacity: usize) -> usize {
    HEADER_LEN.saturating_add(capacity)
}

/// A process-local handle on a ring in some region: the pointers live here, never in
/// the region.
#[derive(Clone, Copy, Debug)]
struct View {
    header: NonNull<RingHeader>,
    data: NonNull<u8>,
    capacity: u64,
}

// SAFETY: a View only reaches the region through atomics (header) and through byte
// ranges that the marker protocol hands to exactly one side at a time (data).
unsafe impl Send for View {}

impl View {
    /// # Safety
    /// `base` must point to `len` bytes that stay mapped, readable and writable for the
    /// life of every view made from it, and that nothing but rings' views mutates.
    unsafe fn new(base: NonNull<u8>, len: usize, capacity: u64) -> Result<Self, RingError> {
        if base.as_ptr().align_offset(64) != 0 {
            return Err(RingError::Misaligned);
        }
        if !capacity.is_power_of_two() || capacity < 64 {
            return Err(RingError::BadCapacity(capacity));
        }
        let needed = usize::try_from(capacity)
            .map(region_len)
            .unwrap_or(usize::MAX);
        if len < needed {
            return Err(RingError::TooSmall {
                needed,
                actual: len,
            });
        }
        // SAFETY: HEADER_LEN < needed <= len, so the offset stays inside the region.
        let data = unsafe { base.add(HEADER_LEN) };
        Ok(Self {
            header: base.cast(),
            data,
            capacity,
        })
    }

    fn header(&self) -> &RingHeader {
        // SAFETY: the header is aligned, inside the region (checked in `new`), made only of
        // atomics, and the region outlives the view (`new`'s contract).
        unsafe { self.header.as_ref() }
    }

    /// Copies `src` into the ring at stream position `pos` (wrapping).
    ///
    /// # Safety
    /// The producer must own `[pos, pos + src.len())` (within `capacity` of `tail`).
    unsafe fn copy_in(&self, pos: u64, src: &[u8]) {
        let (first, second) = self.split(pos, src.len());
        let (a, b) = src.split_at(first);
        // SAFETY: the two pieces are in bounds of the data area (split keeps them below
        // capacity) and owned by the producer (caller's contract); src is a distinct
        // local buffer.
        unsafe {
            core::ptr::copy_nonoverlapping(
                a.as_ptr(),
                self.data.as_ptr().wrapping_add(self.offset(pos)),
                first,
            );
        }
        // SAFETY: as above; the second piece starts at offset 0 of the data area.
        unsafe {
            core::ptr::copy_nonoverlapping(b.as_ptr(), self.data.as_ptr(), second);
        }
    }

    /// Copies out of the ring at stream position `pos` into `dst` (wrapping), with the
    /// stores `to` asks for.
    ///
    /// # Safety
    /// The consumer must own `[pos, pos + dst.len())` (below `head`).
    unsafe fn copy_out(&self, pos: u64, dst: &mut [u8], to: Dest) {
        let (first, _) = self.split(pos, dst.len());
        let (a, b) = dst.split_at_mut(first);
        // SAFETY: in bounds (see `split`), owned by the consumer (caller's contract).
        unsafe { to.copy(self.data.as_ptr().wrapping_add(self.offset(pos)), a) };
        // SAFETY: as above, second piece at offset 0.
        unsafe { to.copy(self.data.as_ptr(), b) };
    }

    fn offset(&self, pos: u64) -> usize {
        // The mask keeps the value below capacity, which fits usize (checked in `new`).
        usize::try_from(pos & (self.capacity - 1)).unwrap_or(0)
    }

    /// Splits `len` bytes at `pos` into the part before the end of the data area and the
    /// part that wraps to its start. `len` never exceeds capacity.
    fn split(&self, pos: u64, len: usize) -> (usize, usize) {
        let off = self.offset(pos);
        let cap = usize::try_from(self.capacity).unwrap_or(usize::MAX);
        let first = len.min(cap - off);
        (first, len - first)
    }
}

/// How a read's bytes are stored into its destination.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Dest {
    /// Ordinary stores: the bytes end up in the reader's cache, where a reader that
    /// looks at them next wants them.
    Cached,
    /// Non-temporal ("streaming") stores on x86-64: whole 64-byte lines go to memory
    /// without first being fetched into the cache (and without evicting what is there).
    /// For destinations far larger than the cache, where ordinary stores cost a read of
    /// every line before it is written: a 64 MiB read out of the ring then moves a
    /// third less memory traffic. Elsewhere the same as [`Dest::Cached`].
    Streaming,
}

impl Dest {
    /// Copies `dst.len()` bytes from `src` into `dst`.
    ///
    /// # Safety
    /// `src` must be valid for reads of `dst.len()` bytes that no one writes meanwhile,
    /// and must not overlap `dst`.
    unsafe fn copy(self, src: *const u8, dst: &mut [u8]) {
        let len = dst.len();
        let dst = dst.as_mut_ptr();
        if self == Self::Cached {
            // SAFETY: the caller's contract; `dst` is a distinct, exclusive slice.
            unsafe { core::ptr::copy_nonoverlapping(src, dst, len) };
            return;
        }
        // The unaligned head up to `dst`'s first line boundary, then whole lines, then
        // the tail, each with ordinary stores. (`align_offset` may answer usize::MAX,
        // meaning "unknown": then everything is head.)
        let head = dst.align_offset(LINE).min(len);
        let lines = (len - head) / LINE;
        // SAFETY: head <= len, in bounds of both (the caller's contract).
        unsafe { core::ptr::copy_nonoverlapping(src, dst, head) };
        for i in 0..lines {
            let at = head + i * LINE;
            // SAFETY: at + LINE <= head + lines * LINE <= len, so both lines are in
            // bounds; dst + at is LINE-aligned (head aligned it; LINE steps keep it).
            unsafe { stream_line(src.wrapping_add(at), dst.wrapping_add(at)) };
        }
        let done = head + lines * LINE;
        // SAFETY: done <= len, the rest of both ranges.
        unsafe {
            core::ptr::copy_nonoverlapping(
                src.wrapping_add(done),
                dst.wrapping_add(done),
                len - done,
            );
        }
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        // SAFETY: a store fence has no preconditions. Streaming stores are weakly
        // ordered: the fence makes them visible before any store after it (the Release
        // that frees the ring space, and whatever hands the buffer to another thread).
        unsafe {
            core::arch::x86_64::_mm_sfence();
        }
    }
}

/// A cache line.
const LINE: usize = 64;

/// Copies one line from `src` (any alignment) to `dst` (LINE-aligned) with streaming
/// stores where the CPU has them (an ordinary copy under Miri, which checks the bounds
/// and alignment arithmetic around it).
///
/// # Safety
/// `src` readable and `dst` writable for LINE bytes, not overlapping; `dst` LINE-aligned.
#[inline(always)]
unsafe fn stream_line(src: *const u8, dst: *mut u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    for i in 0..LINE / 16 {
        // SAFETY: the i-th 16 bytes of both lines (the caller's contract); dst's line is
        // aligned, so these land on a 16-byte boundary.
        unsafe { stream16(src.wrapping_add(i * 16), dst.wrapping_add(i * 16)) };
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    // SAFETY: the caller's contract.
    unsafe {
        core::ptr::copy_nonoverlapping(src, dst, LINE);
    }
}

/// One unaligned 16-byte load and one streaming store.
///
/// # Safety
/// `src` readable and `dst` writable for 16 bytes; `dst` 16-byte aligned.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
unsafe fn stream16(src: *const u8, dst: *mut u8) {
    use core::arch::x86_64::{_mm_loadu_si128, _mm_stream_si128};
    // SAFETY: readable for 16 bytes (the caller's contract); any alignment. SSE2 is part
    // of x86-64.
    let v = unsafe { _mm_loadu_si128(src.cast()) };
    // SAFETY: writable and 16-byte aligned (the caller's contract).
    unsafe { _mm_stream_si128(dst.cast(), v) };
}

/// Initialises a ring of `capacity` data bytes at `base` and returns both ends.
///
/// # Errors
/// [`RingError`] when the region is misaligned, too small or the capacity is not a power
/// of two of at least 64.
///
/// # Safety
/// `base` must point to `len` writable bytes that stay mapped while any end (or any end
/// attached later with [`attach_producer`] or [`attach_consumer`]) lives, that no one else is using as a ring right now,
/// and that only ring ends mutate afterwards.
pub unsafe fn create(
    base: NonNull<u8>,
    len: usize,
    capacity: u64,
) -> Result<(Producer, Consumer), RingError> {
    // SAFETY: forwarded contract.
    let view = unsafe { View::new(base, len, capacity)? };
    let h = view.header();
    h.capacity.store(capacity, Ordering::Relaxed);
    h.head.store(0, Ordering::Relaxed);
    h.tail.store(0, Ordering::Relaxed);
    for flag in [
        &h.producer_parked,
        &h.producer_closed,
        &h.consumer_parked,
        &h.consumer_closed,
    ] {
        flag.store(0, Ordering::Relaxed);
    }
    // SYNC POINT: pairs with the Acquire load of `magic` in `attach`: a process that sees
    // the magic sees the initialised fields.
    h.magic.store(RING_MAGIC, Ordering::Release);
    Ok((
        Producer {
            view,
            head: 0,
            tail_seen: Cell::new(0),
        },
        Consumer { view, tail: 0 },
    ))
}

/// Which end of an existing ring to attach to.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum End {
    /// The writing end.
    Producer,
    /// The reading end.
    Consumer,
}

/// Attaches to a ring another process created in a shared region.
///
/// # Errors
/// [`RingError::BadMagic`] if the region holds no initialised ring; the checks of
/// [`create`] on the capacity found in the header.
///
/// # Safety
/// As for [`create`], and at most one producer and one consumer may exist per ring
/// across all processes.
pub unsafe fn attach_producer(base: NonNull<u8>, len: usize) -> Result<Producer, RingError> {
    // SAFETY: forwarded contract.
    unsafe { attach(base, len) }.map(|view| {
        let head = view.header().head.load(Ordering::Relaxed);
        // Nothing seen yet: a full ring, so the first write loads the real tail.
        let tail_seen = Cell::new(head.wrapping_sub(view.capacity));
        Producer {
            view,
            head,
            tail_seen,
        }
    })
}

/// The consumer counterpart of [`attach_producer`].
///
/// # Errors
/// As [`attach_producer`].
///
/// # Safety
/// As [`attach_producer`].
pub unsafe fn attach_consumer(base: NonNull<u8>, len: usize) -> Result<Consumer, RingError> {
    // SAFETY: forwarded contract.
    unsafe { attach(base, len) }.map(|view| {
        let tail = view.header().tail.load(Ordering::Relaxed);
        Consumer { view, tail }
    })
}

unsafe fn attach(base: NonNull<u8>, len: usize) -> Result<View, RingError> {
    if base.as_ptr().align_offset(64) != 0 {
        return Err(RingError::Misaligned);
    }
    if len < HEADER_LEN {
        return Err(RingError::TooSmall {
            needed: HEADER_LEN,
            actual: len,
        });
    }
    // SAFETY: aligned and at least HEADER_LEN bytes (checked above); atomics only.
    let header = unsafe { base.cast::<RingHeader>().as_ref() };
    // SYNC POINT: pairs with the Release store of `magic` in `create`.
    if header.magic.load(Ordering::Acquire) != RING_MAGIC {
        return Err(RingError::BadMagic);
    }
    let capacity = header.capacity.load(Ordering::Relaxed);
    // SAFETY: forwarded contract; `new` re-checks the capacity against `len`.
    unsafe { View::new(base, len, capacity) }
}

/// The writing end of a ring. It keeps its own `head` locally and only publishes it, so
/// a peer scribbling on the shared header cannot move it.
#[derive(Debug)]
pub struct Producer {
    view: View,
    head: u64,
    /// The consumer's `tail` as last loaded. Space only grows behind our back, so this
    /// gives a lower bound on it without touching the consumer's cache line; the real
    /// `tail` is loaded only when the bound is not enough.
    tail_seen: Cell<u64>,
}

/// The reading end of a ring. It keeps its own `tail` locally (see [`Producer`]).
#[derive(Debug)]
pub struct Consumer {
    view: View,
    tail: u64,
}

impl Producer {
    /// Bytes that can be written now (at least; more may have been freed since the
    /// consumer's position was last loaded, which happens whenever this would be 0).
    pub fn writable(&self) -> usize {
        self.space(1)
    }

    /// Free space, loading the consumer's `tail` only when the last one seen leaves less
    /// than `want`.
    fn space(&self, want: usize) -> usize {
        let free = |tail: u64| {
            // `tail` comes from the peer: a value outside [head - capacity, head] (a
            // broken or hostile peer) yields no space rather than an out-of-range copy.
            let used = self.head.wrapping_sub(tail);
            usize::try_from(self.view.capacity.saturating_sub(used)).unwrap_or(0)
        };
        let known = free(self.tail_seen.get());
        if known >= want {
            return known;
        }
        // SYNC POINT: pairs with the Release store of `tail` in Consumer::read: the space
        // it frees is no longer being read.
        let tail = self.view.header().tail.load(Ordering::Acquire);
        self.tail_seen.set(tail);
        free(tail)
    }

    /// Copies as much of `src` as fits and publishes it; returns the bytes written.
    /// Call [`Producer::wake_consumer`] afterwards to learn whether to signal the peer.
    pub fn write(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.space(src.len()));
        if n == 0 {
            return 0;
        }
        self.append(src.get(..n).unwrap_or_default());
        self.publish();
        n
    }

    /// Copies every buffer of `srcs`, one after the other, and publishes them together —
    /// if they all fit now. Otherwise writes nothing and returns `false`. Call
    /// [`Producer::wake_consumer`] after a `true`.
    pub fn write_all(&mut self, srcs: &[&[u8]]) -> bool {
        let Some(total) = srcs.iter().try_fold(0usize, |t, s| t.checked_add(s.len())) else {
            return false;
        };
        if self.space(total) < total {
            return false;
        }
        for src in srcs {
            self.append(src);
        }
        self.publish();
        true
    }

    /// Copies `src` behind the bytes written so far, unpublished. `src` must fit: the
    /// caller checked it against [`Producer::space`] (with what it appended before).
    fn append(&mut self, src: &[u8]) {
        let head = self.head;
        // SAFETY: [head, head + src.len()) is free space owned by the producer (the
        // caller's check against `space`), and copy_in masks offsets into the data area
        // whatever the markers hold.
        unsafe { self.view.copy_in(head, src) };
        self.head = head.wrapping_add(src.len() as u64);
    }

    /// Makes everything appended visible to the consumer.
    fn publish(&self) {
        // SYNC POINT: pairs with the Acquire load of `head` in Consumer::readable: the
        // bytes copied before are visible before the new head.
        self.view.header().head.store(self.head, Ordering::Release);
    }

    /// After a write: returns `true` if the consumer is parked and must be woken. Clears
    /// its parked flag, so exactly one wake-up is sent per park.
    pub fn wake_consumer(&self) -> bool {
        let h = self.view.header();
        // SYNC POINT: SeqCst fence pairs with the one in Consumer::park (Dekker): either
        // the consumer sees our new head before sleeping, or we see its flag here.
        fence(Ordering::SeqCst);
        // Look before clearing: a plain load leaves the consumer's cache line shared,
        // where a swap on every write would take it away from the consumer each time.
        h.consumer_parked.load(Ordering::Relaxed) != 0
            && h.consumer_parked.swap(0, Ordering::AcqRel) != 0
    }

    /// Announces that the producer waits for space. Returns `false` if space appeared
    /// meanwhile (do not sleep); `true` means: sleep until woken.
    pub fn park(&self) -> bool {
        let h = self.view.header();
        h.producer_parked.store(1, Ordering::Relaxed);
        // SYNC POINT: pairs with the fence in Consumer::wake_producer.
        fence(Ordering::SeqCst);
        if self.writable() > 0 || self.peer_closed() {
            h.producer_parked.store(0, Ordering::Relaxed);
            false
        } else {
            true
        }
    }

    /// Marks the producer closed: the consumer reads what is left, then sees the end.
    pub fn close(&self) {
        // SYNC POINT: Release pairs with the Acquire in Consumer::peer_closed, after the
        // final head store.
        self.view
            .header()
            .producer_closed
            .store(1, Ordering::Release);
    }

    /// Returns `true` once the consumer closed its end.
    pub fn peer_closed(&self) -> bool {
        // SYNC POINT: pairs with the Release store in Consumer::close.
        self.view.header().consumer_closed.load(Ordering::Acquire) != 0
    }
}

impl Consumer {
    /// Bytes that can be read now.
    pub fn readable(&self) -> usize {
        // SYNC POINT: pairs with the Release store of `head` in Producer::write.
        let head = self.view.header().head.load(Ordering::Acquire);
        // `head` comes from the peer: never report more than the ring holds.
        let avail = head.wrapping_sub(self.tail).min(self.view.capacity);
        usize::try_from(avail).unwrap_or(0)
    }

    /// Asks the CPU to fetch the lines the next bytes will be read from (the first
    /// [`PREFETCH_LINES`] at `tail`), without reading them. A consumer that waits for
    /// data calls this with each look at `head`: the fetch of the data then overlaps the
    /// fetch of `head` instead of following it, one transfer between cores fewer on the
    /// way to a small message's first byte. A hint only: no memory is accessed, so it
    /// races with nothing the producer does.
    pub fn prefetch_next(&self) {
        #[cfg(target_arch = "x86_64")]
        for line in 0..PREFETCH_LINES {
            use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let off = self.view.offset(self.tail.wrapping_add(line * 64));
            let p = self.view.data.as_ptr().wrapping_add(off).cast::<i8>();
            // SAFETY: a prefetch reads nothing and faults on nothing; the address is
            // inside the data area anyway (`offset` masks into it).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
        }
    }

    /// Copies up to `dst.len()` readable bytes into `dst` and frees their space; returns
    /// the bytes read. Call [`Consumer::wake_producer`] afterwards.
    pub fn read(&mut self, dst: &mut [u8]) -> usize {
        self.read_to(dst, Dest::Cached)
    }

    /// [`Consumer::read`], storing into `dst` as `to` says.
    pub fn read_to(&mut self, dst: &mut [u8], to: Dest) -> usize {
        let n = dst.len().min(self.readable());
        if n > 0 {
            self.take(dst.get_mut(..n).unwrap_or_default(), to);
        }
        n
    }

    /// Fills all of `dst` if that many bytes are readable now; otherwise reads nothing
    /// and returns `false`. Call [`Consumer::wake_producer`] after a `true`.
    pub fn read_exact_now(&mut self, dst: &mut [u8]) -> bool {
        if dst.is_empty() {
            return true;
        }
        if self.readable() < dst.len() {
            return false;
        }
        self.take(dst, Dest::Cached);
        true
    }

    /// Copies the next `dst.len()` bytes out and frees them. The caller checked that
    /// they are readable.
    fn take(&mut self, dst: &mut [u8], to: Dest) {
        let tail = self.tail;
        // SAFETY: [tail, tail + dst.len()) holds published bytes owned by the consumer
        // (the caller's check: dst.len() <= readable <= capacity), and copy_out masks
        // offsets into the data area.
        unsafe { self.view.copy_out(tail, dst, to) };
        self.tail = tail.wrapping_add(dst.len() as u64);
        // SYNC POINT: pairs with the Acquire load of `tail` in Producer::writable: we are
        // done reading these bytes before the producer may overwrite them.
        self.view.header().tail.store(self.tail, Ordering::Release);
    }

    /// After a read: returns `true` if the producer is parked and must be woken.
    pub fn wake_producer(&self) -> bool {
        let h = self.view.header();
        // SYNC POINT: pairs with the fence in Producer::park.
        fence(Ordering::SeqCst);
        // Look before clearing (see Producer::wake_consumer).
        h.producer_parked.load(Ordering::Relaxed) != 0
            && h.producer_parked.swap(0, Ordering::AcqRel) != 0
    }

    /// Announces that the consumer waits for data. Returns `false` if data (or the end)
    /// appeared meanwhile; `true` means: sleep until woken.
    pub fn park(&self) -> bool {
        let h = self.view.header();
        h.consumer_parked.store(1, Ordering::Relaxed);
        // SYNC POINT: pairs with the fence in Producer::wake_consumer.
        fence(Ordering::SeqCst);
        if self.readable() > 0 || self.peer_closed() {
            h.consumer_parked.store(0, Ordering::Relaxed);
            false
        } else {
            true
        }
    }

    /// Marks the consumer closed: the producer's further writes are pointless.
    pub fn close(&self) {
        // SYNC POINT: pairs with the Acquire in Producer::peer_closed.
        self.view
            .header()
            .consumer_closed
            .store(1, Ordering::Release);
    }

    /// Returns `true` once the producer closed its end (read what is left first).
    pub fn peer_closed(&self) -> bool {
        // SYNC POINT: pairs with the Release store in Producer::close.
        self.view.header().producer_closed.load(Ordering::Acquire) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[repr(C, align(64))]
    struct Region<const N: usize>([u8; N]);

    fn region<const N: usize>() -> Box<Region<N>> {
        Box::new(Region([0u8; N]))
    }

    fn base<const N: usize>(r: &mut Region<N>) -> NonNull<u8> {
        NonNull::from(&mut r.0).cast()
    }

    #[test]
    fn header_fields_sit_on_the_documented_lines() {
        use core::mem::offset_of;
        assert_eq!(offset_of!(RingHeader, magic), 0);
        assert_eq!(offset_of!(RingHeader, capacity), 8);
        assert_eq!(offset_of!(RingHeader, head), 64);
        assert_eq!(offset_of!(RingHeader, producer_parked), 72);
        assert_eq!(offset_of!(RingHeader, producer_closed), 76);
        assert_eq!(offset_of!(RingHeader, tail), 128);
        // The flags the producer reads after every write: not on `tail`'s line.
        assert_eq!(offset_of!(RingHeader, consumer_parked), 192);
        assert_eq!(offset_of!(RingHeader, consumer_closed), 196);
        assert_eq!(HEADER_LEN, 256);
    }

    #[test]
    fn ring_write_read_wraps_around() {
        let mut r = region::<{ HEADER_LEN + 64 }>();
        // SAFETY: the region outlives both ends, which are dropped at the end of the test.
        let (mut p, mut c) = unsafe { create(base(&mut r), HEADER_LEN + 64, 64) }.unwrap();
        let mut out = [0u8; 64];
        for round in 0..10u8 {
            let data: Vec<u8> = (0..40).map(|i| i ^ round).collect();
            assert_eq!(p.write(&data), 40);
            assert_eq!(c.readable(), 40);
            assert_eq!(c.read(&mut out[..40]), 40);
            assert_eq!(&out[..40], &data[..]);
        }
    }

    /// Streaming reads land the same bytes as ordinary ones, whatever the destination's
    /// alignment (head, whole lines, tail), the length, and where the ring wraps.
    #[test]
    fn streaming_reads_copy_every_byte_at_every_alignment() {
        const CAP: usize = 512;
        let mut r = region::<{ HEADER_LEN + CAP }>();
        // SAFETY: the region outlives both ends, which are dropped at the end of the test.
        let (mut p, mut c) = unsafe { create(base(&mut r), HEADER_LEN + CAP, CAP as u64) }.unwrap();
        #[repr(C, align(64))]
        struct Out([u8; 512]);
        let mut out = Out([0; 512]);
        let mut seed = 0u8;
        for len in [0usize, 1, 63, 64, 65, 130, 200, 448] {
            for skew in [0usize, 1, 17, 63] {
                seed = seed.wrapping_add(1);
                let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
                assert_eq!(p.write(&data), len);
                out.0.fill(0xee);
                let dst = &mut out.0[skew..skew + len];
                assert_eq!(c.read_to(dst, Dest::Streaming), len);
                assert_eq!(&out.0[skew..skew + len], &data[..], "len {len} skew {skew}");
                assert!(out.0[..skew].iter().all(|&b| b == 0xee), "nothing before");
                assert!(
                    out.0[skew + len..].iter().all(|&b| b == 0xee),
                    "nothing after"
                );
            }
        }
    }

    #[test]
    fn ring_full_write_is_partial_and_empty_read_is_zero() {
        let mut r = region::<{ HEADER_LEN + 64 }>();
        // SAFETY: as above.
        let (mut p, mut c) = unsafe { create(base(&mut r), HEADER_LEN + 64, 64) }.unwrap();
        assert_eq!(c.read(&mut [0u8; 8]), 0);
        assert_eq!(p.write(&[1u8; 100]), 64);
        assert_eq!(p.writable(), 0);
        assert_eq!(p.write(&[1u8; 1]), 0);
        assert!(p.park(), "full ring: the producer may sleep");
        let mut out = [0u8; 10];
        assert_eq!(c.read(&mut out), 10);
        assert!(c.wake_producer(), "the parked producer is woken once");
        assert!(!c.wake_producer());
        assert_eq!(p.writable(), 10);
    }

    #[test]
    fn ring_park_refuses_when_work_is_there() {
        let mut r = region::<{ HEADER_LEN + 64 }>();
        // SAFETY: as above.
        let (mut p, c) = unsafe { create(base(&mut r), HEADER_LEN + 64, 64) }.unwrap();
        assert!(c.park());
        p.write(b"x");
        assert!(p.wake_consumer());
        assert!(!c.park(), "data is there: do not sleep");
        p.close();
        assert!(c.peer_closed());
    }

    #[test]
    fn ring_attach_checks_magic_alignment_and_size() {
        let mut r = region::<{ HEADER_LEN + 128 }>();
        let b = base(&mut r);
        // SAFETY: the region outlives every end made in this test.
        let r1 = unsafe { attach_consumer(b, HEADER_LEN + 128) };
        assert_eq!(r1.unwrap_err(), RingError::BadMagic);
        // SAFETY: as above.
        let r2 = unsafe { create(b, HEADER_LEN + 128, 100) };
        assert_eq!(r2.unwrap_err(), RingError::BadCapacity(100));
        // SAFETY: as above.
        let r3 = unsafe { create(b, HEADER_LEN + 64, 128) };
        assert!(matches!(r3, Err(RingError::TooSmall { .. })));
        // SAFETY: as above.
        let (mut p, _unused_consumer) = unsafe { create(b, HEADER_LEN + 128, 128) }.unwrap();
        // SAFETY: as above; the first consumer is never used, so one consumer reads.
        let mut c2 = unsafe { attach_consumer(b, HEADER_LEN + 128) }.unwrap();
        p.write(b"hello");
        let mut out = [0u8; 5];
        assert_eq!(c2.read(&mut out), 5);
        assert_eq!(&out, b"hello");
        let misaligned = NonNull::new(b.as_ptr().wrapping_add(1)).unwrap();
        // SAFETY: rejected before the region is touched.
        let r4 = unsafe { attach_producer(misaligned, 64) };
        assert_eq!(r4.unwrap_err(), RingError::Misaligned);
    }

    #[test]
    fn a_producer_attached_to_a_ring_with_unread_bytes_never_overwrites_them() {
        let mut r = region::<{ HEADER_LEN + 64 }>();
        // One pointer for every end: a second `&mut r` would invalidate the first.
        let b = base(&mut r);
        let mut c = {
            // SAFETY: as above; this producer is gone before the second one attaches.
            let (mut p, c) = unsafe { create(b, HEADER_LEN + 64, 64) }.unwrap();
            assert_eq!(p.write(&[1u8; 40]), 40);
            c
        };
        // SAFETY: the region outlives the new end; only one producer exists.
        let mut p = unsafe { attach_producer(b, HEADER_LEN + 64) }.unwrap();
        assert_eq!(p.writable(), 24, "40 of 64 bytes are still unread");
        assert_eq!(p.write(&[2u8; 64]), 24);
        let mut out = [0u8; 64];
        assert_eq!(c.read(&mut out), 64);
        assert!(out[..40].iter().all(|&b| b == 1) && out[40..].iter().all(|&b| b == 2));
    }

    #[test]
    fn ring_survives_a_peer_scribbling_on_the_header() {
        let mut r = region::<{ HEADER_LEN + 64 }>();
        // SAFETY: as above.
        let (mut p, mut c) = unsafe { create(base(&mut r), HEADER_LEN + 64, 64) }.unwrap();
        // The producer trusts the last tail it saw for the space that leaves (space only
        // grows), so fill the ring first: from then on it must load the tail.
        assert_eq!(p.write(&[7u8; 64]), 64);
        // A hostile peer sets its marker far ahead / behind.
        p.view.header().tail.store(u64::MAX / 2, Ordering::Relaxed);
        assert_eq!(
            p.writable(),
            0,
            "nonsense tail: no space, no out-of-range write"
        );
        assert_eq!(p.write(b"abc"), 0);
        p.view.header().tail.store(1, Ordering::Relaxed);
        assert_eq!(
            p.write(b"abc"),
            1,
            "an honest tail again: the space it frees"
        );
        p.view.header().tail.store(0, Ordering::Relaxed);
        c.view.header().head.store(u64::MAX - 3, Ordering::Relaxed);
        assert!(c.readable() <= 64, "never more than the ring holds");
        let mut out = [0u8; 128];
        assert!(c.read(&mut out) <= 64);
    }

    #[test]
    fn ring_two_threads_stream_every_byte_in_order() {
        const TOTAL: usize = if cfg!(miri) { 2_000 } else { 1 << 20 };
        let mut r = region::<{ HEADER_LEN + 256 }>();
        // SAFETY: the scope below ends both threads before the region is dropped.
        let (mut p, mut c) = unsafe { create(base(&mut r), HEADER_LEN + 256, 256) }.unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                let start = Instant::now();
                let mut sent = 0usize;
                let mut chunk = 1usize;
                while sent < TOTAL {
                    let n = chunk.min(TOTAL - sent);
                    let data: Vec<u8> = (sent..sent + n).map(|i| (i % 251) as u8).collect();
                    let w = p.write(&data);
                    sent += w;
                    chunk = chunk % 97 + 13;
                    if w == 0 {
                        assert!(
                            start.elapsed() < Duration::from_secs(60),
                            "consumer stalled"
                        );
                        std::thread::yield_now();
                    }
                }
                p.close();
            });
            s.spawn(move || {
                let mut got = 0usize;
                let mut buf = [0u8; 77];
                loop {
                    let n = c.read(&mut buf);
                    for (k, b) in buf[..n].iter().enumerate() {
                        assert_eq!(*b, ((got + k) % 251) as u8, "byte {} corrupted", got + k);
                    }
                    got += n;
                    if n == 0 {
                        if c.peer_closed() && c.readable() == 0 {
                            break;
                        }
                        std::thread::yield_now();
                    }
                }
                assert_eq!(got, TOTAL);
            });
        });
    }

    #[test]
    fn all_or_nothing_writes_and_reads_move_everything_or_nothing() {
        let mut r = region::<{ HEADER_LEN + 64 }>();
        // SAFETY: as above.
        let (mut p, mut c) = unsafe { create(base(&mut r), HEADER_LEN + 64, 64) }.unwrap();
        assert!(p.write_all(&[&[1u8; 30], &[2u8; 30]]));
        assert!(
            !p.write_all(&[&[3u8; 3], &[4u8; 2]]),
            "5 bytes do not fit in 4"
        );
        assert_eq!(c.readable(), 60, "a refused write leaves no trace");
        let mut out = [0u8; 61];
        assert!(!c.read_exact_now(&mut out), "61 bytes are not there");
        assert_eq!(c.readable(), 60, "a refused read takes nothing");
        assert!(c.read_exact_now(&mut out[..60]));
        assert_eq!(&out[..30], &[1u8; 30]);
        assert_eq!(&out[30..60], &[2u8; 30]);
        // Across the end of the data area.
        assert!(p.write_all(&[b"abc", b"", &[9u8; 40]]));
        assert!(c.read_exact_now(&mut out[..43]));
        assert_eq!(&out[..3], b"abc");
        assert_eq!(&out[3..43], &[9u8; 40]);
        assert!(c.read_exact_now(&mut []));
        assert!(p.write_all(&[]));
        // A hostile head never makes a read take more than the ring holds.
        c.view.header().head.store(u64::MAX - 3, Ordering::Relaxed);
        assert!(!c.read_exact_now(&mut [0u8; 65]));
    }

    proptest::proptest! {
        /// Any mix of partial and all-or-nothing writes and reads streams the same bytes
        /// as a plain queue would. (Too slow for miri; the test above covers the same
        /// unsafe copies there.)
        #[test]
        #[cfg_attr(miri, ignore)]
        fn every_kind_of_read_and_write_keeps_the_byte_stream(
            ops in proptest::collection::vec((0u8..4, 0usize..80, 0usize..3), 1..200)
        ) {
            let mut r = region::<{ HEADER_LEN + 64 }>();
            // SAFETY: as above.
            let (mut p, mut c) = unsafe { create(base(&mut r), HEADER_LEN + 64, 64) }.unwrap();
            let mut model = std::collections::VecDeque::new();
            let mut next = 0u8;
            let mut fresh = |n: usize| -> Vec<u8> {
                (0..n).map(|_| { next = next.wrapping_add(1); next }).collect()
            };
            for (kind, len, pieces) in ops {
                match kind {
                    0 => {
                        let data = fresh(len);
                        let n = p.write(&data);
                        proptest::prop_assert_eq!(n, len.min(64 - model.len()));
                        model.extend(&data[..n]);
                    }
                    1 => {
                        let parts: Vec<Vec<u8>> = (0..=pieces).map(|_| fresh(len / (pieces + 1))).collect();
                        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                        let total: usize = parts.iter().map(Vec::len).sum();
                        let fits = total <= 64 - model.len();
                        proptest::prop_assert_eq!(p.write_all(&refs), fits);
                        if fits {
                            parts.iter().for_each(|d| model.extend(d));
                        }
                    }
                    2 => {
                        let mut out = vec![0u8; len];
                        let n = c.read(&mut out);
                        proptest::prop_assert_eq!(n, len.min(model.len()));
                        let want: Vec<u8> = model.drain(..n).collect();
                        proptest::prop_assert_eq!(&out[..n], &want[..]);
                    }
                    _ => {
                        let mut out = vec![0u8; len];
                        let there = len <= model.len();
                        proptest::prop_assert_eq!(c.read_exact_now(&mut out), there);
                        if there {
                            let want: Vec<u8> = model.drain(..len).collect();
                            proptest::prop_assert_eq!(out, want);
                        }
                    }
                }
                proptest::prop_assert_eq!(c.readable(), model.len());
            }
        }
    }
}
