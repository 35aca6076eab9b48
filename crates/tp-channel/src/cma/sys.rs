//! The calls without a safe wrapper: `process_vm_readv`, `process_vm_writev` and
//! `getrandom`.

use std::io;

/// The most one `process_vm_readv` or `process_vm_writev` moves (the kernel's
/// `MAX_RW_COUNT`).
pub(crate) const MAX_CHUNK: usize = 0x7fff_f000;

fn remote_iov(addr: u64, len: usize) -> io::Result<libc::iovec> {
    Ok(libc::iovec {
        iov_base: usize::try_from(addr).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?
            as *mut libc::c_void,
        iov_len: len,
    })
}

/// Copies `dst.len()` bytes (at most [`MAX_CHUNK`]) from address `addr` of process
/// `pid` into `dst`. Returns how many bytes arrived (fewer on a partial read).
pub(crate) fn read_remote(pid: i32, addr: u64, dst: &mut [u8]) -> io::Result<usize> {
    let len = dst.len().min(MAX_CHUNK);
    let local = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = remote_iov(addr, len)?;
    // SAFETY: `local` describes `len <= dst.len()` bytes of `dst`, which we hold mutably
    // for the duration of the call, so the kernel's writes land only there. `remote`
    // names memory of the other process; the kernel checks that access (permissions,
    // mapping) and never touches our memory through it.
    let n = unsafe { libc::process_vm_readv(pid, &raw const local, 1, &raw const remote, 1, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Copies `src` (at most [`MAX_CHUNK`] bytes of it) to address `addr` of process
/// `pid`. Returns how many bytes were written (fewer on a partial write).
pub(crate) fn write_remote(pid: i32, addr: u64, src: &[u8]) -> io::Result<usize> {
    let len = src.len().min(MAX_CHUNK);
    let local = libc::iovec {
        iov_base: src.as_ptr().cast_mut().cast(),
        iov_len: len,
    };
    let remote = remote_iov(addr, len)?;
    // SAFETY: `local` describes `len <= src.len()` bytes of `src`, which we borrow for
    // the call; the kernel only reads them (the iovec type is shared with readv, hence
    // the `*mut`). `remote` names memory of the other process; the kernel checks that
    // access and never writes our memory through it.
    let n = unsafe { libc::process_vm_writev(pid, &raw const local, 1, &raw const remote, 1, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Fills `buf` with bytes from the kernel's random source.
pub(crate) fn random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or_default();
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we
        // hold mutably for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
