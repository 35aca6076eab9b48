//! The one call without a safe wrapper: `process_vm_readv`.

use std::io;

/// The most one `process_vm_readv` moves (the kernel's `MAX_RW_COUNT`).
pub(crate) const MAX_CHUNK: usize = 0x7fff_f000;

/// Copies `dst.len()` bytes (at most [`MAX_CHUNK`]) from address `addr` of process
/// `pid` into `dst`. Returns how many bytes arrived (fewer on a partial read).
pub(crate) fn read_remote(pid: i32, addr: u64, dst: &mut [u8]) -> io::Result<usize> {
    let len = dst.len().min(MAX_CHUNK);
    let local = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: usize::try_from(addr).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?
            as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` describes `len <= dst.len()` bytes of `dst`, which we hold mutably
    // for the duration of the call, so the kernel's writes land only there. `remote`
    // names memory of the other process; the kernel checks that access (permissions,
    // mapping) and never touches our memory through it.
    let n = unsafe { libc::process_vm_readv(pid, &raw const local, 1, &raw const remote, 1, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
