//! The shared staging slots' memory: a memfd segment, registered with the GPU's copy
//! engines, cut into equal slots after a one-page header holding the creator's token.
//! Every access to the shared bytes from the CPU is in this module.

use std::os::fd::{AsRawFd, OwnedFd};

use tp_channel::ChannelError;
use tp_transport::shm::Segment;

use crate::driver::HostRegistration;

/// Bytes before the first slot: the token, then zeros (one page keeps slots page
/// aligned, which the copy engines like).
pub(super) const HEADER: usize = 4096;
/// Length of the token that proves a mapping is the segment the peer offered.
pub(super) const TOKEN_LEN: usize = 16;

/// A staging segment, ours or the peer's, as this process mapped it.
#[derive(Debug)]
pub(super) struct Region {
    // Dropped before the mapping: unregistered while still mapped.
    registration: Option<HostRegistration>,
    segment: Segment,
    slots: u32,
    slot_len: usize,
}

/// `HEADER + slots × slot_len`, or `None` when it overflows.
pub(super) fn region_len(slots: u32, slot_len: usize) -> Option<usize> {
    usize::try_from(slots)
        .ok()?
        .checked_mul(slot_len)?
        .checked_add(HEADER)
}

impl Region {
    /// A new segment for `slots` slots of `slot_len` bytes, stamped with `token`, and
    /// registered with `gpu`'s driver when given.
    pub(super) fn create(
        slots: u32,
        slot_len: usize,
        token: [u8; TOKEN_LEN],
        gpu: Option<u32>,
    ) -> Result<Self, String> {
        let len = region_len(slots, slot_len).ok_or("staging size overflows")?;
        let segment = Segment::create(len).map_err(|e| format!("create the segment: {e}"))?;
        // SAFETY: the segment is `len` ≥ HEADER bytes, mapped for as long as `segment`,
        // and nobody else can reach it yet (its fd has not been shown to the peer).
        unsafe {
            std::ptr::copy_nonoverlapping(token.as_ptr(), segment.base().as_ptr(), TOKEN_LEN);
        }
        Self::register(segment, slots, slot_len, gpu)
    }

    /// Maps the peer's segment from `fd` (opened through `/proc/<pid>/fd/<n>`), after
    /// checking that it has exactly the offered size and carries the offered token.
    pub(super) fn open(
        fd: OwnedFd,
        slots: u32,
        slot_len: usize,
        token: [u8; TOKEN_LEN],
        gpu: Option<u32>,
    ) -> Result<Self, String> {
        let raw = fd.as_raw_fd();
        let segment = Segment::open(fd).map_err(|e| format!("map fd {raw}: {e}"))?;
        if Some(segment.len()) != region_len(slots, slot_len) {
            return Err(format!(
                "the segment has {} bytes, not the {slots} × {slot_len} + {HEADER} offered",
                segment.len()
            ));
        }
        let mut found = [0u8; TOKEN_LEN];
        // SAFETY: the mapping has at least HEADER bytes (checked above) and lives as
        // long as `segment`; the peer never writes the header after creating it.
        unsafe {
            std::ptr::copy_nonoverlapping(segment.base().as_ptr(), found.as_mut_ptr(), TOKEN_LEN);
        }
        if found != token {
            return Err("the segment does not carry the offered token".into());
        }
        Self::register(segment, slots, slot_len, gpu)
    }

    fn register(
        segment: Segment,
        slots: u32,
        slot_len: usize,
        gpu: Option<u32>,
    ) -> Result<Self, String> {
        let registration = match gpu {
            // SAFETY: the whole mapping, which `segment` keeps mapped; the registration
            // is dropped first (field order).
            Some(device) => Some(
                unsafe { HostRegistration::new(device, segment.base().as_ptr(), segment.len()) }
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        Ok(Self {
            registration,
            segment,
            slots,
            slot_len,
        })
    }

    /// The memfd (its number goes into our offer).
    pub(super) fn fd(&self) -> &OwnedFd {
        self.segment.fd()
    }

    pub(super) fn slots(&self) -> u32 {
        self.slots
    }

    pub(super) fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// The address of chunk `seq`'s slot (chunks take the slots in turn).
    pub(super) fn slot_addr(&self, seq: u64) -> u64 {
        let slot = (seq % u64::from(self.slots)) as usize;
        self.segment.base().as_ptr() as u64 + (HEADER + slot * self.slot_len) as u64
    }

    /// Copies `src` (at most a slot) into chunk `seq`'s slot.
    pub(super) fn write(&self, seq: u64, src: &[u8]) -> Result<(), ChannelError> {
        if src.len() > self.slot_len {
            return Err(ChannelError::protocol(
                "cuda_basic: a chunk overruns its slot",
            ));
        }
        // SAFETY: the slot lies inside the mapping (slot < slots, the mapping is
        // HEADER + slots × slot_len) and `src` fits in it. This side alone writes its
        // own segment's slots, and only slots the peer has released.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.slot_addr(seq) as *mut u8, src.len());
        }
        Ok(())
    }

    /// Copies chunk `seq`'s slot into `dst` (at most a slot).
    pub(super) fn read(&self, seq: u64, dst: &mut [u8]) -> Result<(), ChannelError> {
        if dst.len() > self.slot_len {
            return Err(ChannelError::protocol(
                "cuda_basic: a chunk overruns its slot",
            ));
        }
        // SAFETY: as in `write`, reading the peer's segment. The peer does not write a
        // slot it has announced until we release it; a peer that breaks that rule can
        // only garble the bytes we copy, never reach outside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.slot_addr(seq) as *const u8,
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        Ok(())
    }

    /// Whether the GPU's copy engines can reach the slots.
    pub(super) fn registered(&self) -> bool {
        self.registration.is_some()
    }
}
