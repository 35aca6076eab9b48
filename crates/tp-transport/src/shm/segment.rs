//! Shared-memory segments: sealed memfds mapped `MAP_SHARED`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, Mode, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// The largest segment a peer may hand us (a ring of 1 GiB plus its header).
pub const MAX_SEGMENT: u64 = (1 << 30) + 4096;

/// A mapped memfd. Unmapped on drop; the memory itself lives until the last process
/// holding the fd or a mapping lets go.
///
/// The shm transport keeps its rings in segments; tp-cuda's cuda_basic shares its
/// staging slots through one (the peer maps it by opening `/proc/<pid>/fd/<fd>`).
/// Whoever reads or writes through [`Segment::base`] must agree with the peer on who
/// touches which bytes when: the segment only guarantees that the pages stay mapped.
#[derive(Debug)]
pub struct Segment {
    base: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory that `Segment` itself never reads or
// writes; every access goes through `base()` in unsafe code that answers for it (the
// ring's protocol here, cuda_basic's slot ownership in tp-cuda).
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates a `len`-byte segment, mode 0600, sealed against shrinking and growing so
    /// the peer can map it without fearing SIGBUS.
    ///
    /// # Errors
    /// What memfd_create, ftruncate, sealing or mmap said.
    pub fn create(len: usize) -> io::Result<Self> {
        let fd =
            rustix::fs::memfd_create("tp-shm", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::fchmod(&fd, Mode::RUSR | Mode::WUSR)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        Self::map(fd, len)
    }

    /// Maps a segment the peer sent, after checking it is a regular file sealed against
    /// shrinking, of at most [`MAX_SEGMENT`] bytes.
    ///
    /// # Errors
    /// `InvalidData` for anything else; what fstat or mmap said.
    pub fn open(fd: OwnedFd) -> io::Result<Self> {
        let stat = rustix::fs::fstat(&fd)?;
        if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "peer segment is not a regular file",
            ));
        }
        let seals = rustix::fs::fcntl_get_seals(&fd)?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "peer segment is not sealed against shrinking",
            ));
        }
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        if size == 0 || size > MAX_SEGMENT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer segment of {size} bytes"),
            ));
        }
        Self::map(
            fd,
            usize::try_from(size).map_err(|_| io::ErrorKind::InvalidData)?,
        )
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of a memfd we hold; nothing else in this process
        // aliases it, and it is unmapped only in Drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd.as_fd(),
                0,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(io::ErrorKind::Other)?;
        Ok(Self { base, len, fd })
    }

    /// The first byte of the mapping (page aligned).
    #[must_use]
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// The mapping's length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: creation and `open` refuse size 0).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd behind the mapping.
    #[must_use]
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly what mmap returned, and no view into the mapping
        // outlives the Segment (rings hold an Arc to it).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A ring end together with the mapping it points into: the mapping cannot be dropped
/// while the end exists, which is the contract [`super::ring`]'s constructors need.
#[derive(Debug)]
pub(crate) struct Mapped<E> {
    end: E,
    segment: Segment,
}

impl<E> Mapped<E> {
    /// The segment's fd (to send to the peer).
    pub(crate) fn fd(&self) -> &OwnedFd {
        self.segment.fd()
    }
}

impl<E> std::ops::Deref for Mapped<E> {
    type Target = E;

    fn deref(&self) -> &E {
        &self.end
    }
}

impl<E> std::ops::DerefMut for Mapped<E> {
    fn deref_mut(&mut self) -> &mut E {
        &mut self.end
    }
}

fn ring_error(e: super::ring::RingError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Mapped<super::ring::Consumer> {
    /// Creates a fresh ring of `capacity` bytes in a new segment and keeps its reading
    /// end; the peer attaches the writing end through the segment's fd.
    pub(crate) fn inbox(capacity: usize) -> io::Result<Self> {
        let segment = Segment::create(super::ring::region_len(capacity))?;
        let cap = u64::try_from(capacity).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: the mapping is region_len(capacity) bytes, 64-byte aligned (page
        // aligned), and lives in `segment` beside the end for as long as the end; the
        // producer end made here is dropped, the peer's is the only writer.
        let (_, end) = unsafe { super::ring::create(segment.base(), segment.len(), cap) }
            .map_err(ring_error)?;
        Ok(Self { end, segment })
    }
}

impl Mapped<super::ring::Producer> {
    /// Maps the peer's inbox segment and attaches as its writer.
    pub(crate) fn outbox(fd: OwnedFd) -> io::Result<Self> {
        let segment = Segment::open(fd)?;
        // SAFETY: the mapping lives in `segment` beside the end; it is sealed against
        // shrinking (checked by `open`), so its pages cannot vanish; this is its only
        // producer; `attach_producer` checks the magic, alignment and sizes.
        let end = unsafe { super::ring::attach_producer(segment.base(), segment.len()) }
            .map_err(ring_error)?;
        Ok(Self { end, segment })
    }
}
