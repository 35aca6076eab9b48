//! Receive buffers lent to a helping sender in the same process (xth's help).
//!
//! A receiver whose sender offered help lends its buffer under the sender's parking
//! token ([`park`](crate::park)), split at `from`: the back part for the sender, which
//! looks the loan up by its own token and copies its bytes in; the front part for the
//! receiver itself. No address crosses the connection: a request names a token, and a
//! token reaches only a region its receiver lent for it.
//!
//! While the loan lasts, both parts are reached only through the pointer taken when it
//! began — never through a reference to the whole buffer, which would cover the bytes
//! the other thread is writing. The back part is used at most once, under its lock,
//! and [`revoke`] takes that lock too: once `revoke` returns, no copy into it is
//! running or can start, so the receiver may use its whole buffer again. The receiver
//! revokes when the sender answered, or when it gives up waiting for the answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// A lent region: `len` bytes from `ptr`.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a region is written only through `with_lent` or `with_front`, by one thread
// at a time (under its own lock), while the lender keeps it valid (`lend`'s contract).
unsafe impl Send for Region {}

impl Region {
    /// Runs `f` on the region's bytes.
    fn with<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        // SAFETY: the lender keeps the region valid and touches it only through this
        // loan until `revoke` returns, which waits for the lock the caller holds; the
        // front and back regions of a loan are disjoint.
        f(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }
}

/// One loan: the sender's back part (used once), the receiver's front part.
struct Loan {
    back: Mutex<Option<Region>>,
    front: Mutex<Option<Region>>,
    /// Who lent it: only this receiver reaches the front part (two receives that were
    /// handed the same token by a forged descriptor must not share one).
    owner: usize,
}

fn loans() -> &'static Mutex<HashMap<u64, Arc<Loan>>> {
    static LOANS: OnceLock<Mutex<HashMap<u64, Arc<Loan>>>> = OnceLock::new();
    LOANS.get_or_init(Mutex::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Lends the `len` bytes from `ptr` under `key`: `..from` to the lender's own
/// [`with_front`] (the lender named by `owner`, an address unique to it while the loan
/// lasts), `from..` to one [`with_lent`]; `false` (nothing lent) if `key` is lent
/// already.
///
/// # Safety
/// The region must stay valid for writes, and nothing else may read or write it, until
/// [`revoke`]`(key)` returns — or for ever, if it is never called.
pub(crate) unsafe fn lend(key: u64, ptr: *mut u8, len: usize, from: usize, owner: usize) -> bool {
    let from = from.min(len);
    let mut loans = lock(loans());
    if loans.contains_key(&key) {
        return false;
    }
    let loan = Loan {
        owner,
        front: Mutex::new(Some(Region { ptr, len: from })),
        back: Mutex::new(Some(Region {
            ptr: ptr.wrapping_add(from),
            len: len - from,
        })),
    };
    loans.insert(key, Arc::new(loan));
    true
}

/// Ends the loan under `key`: waits for copies into it that are running, and none can
/// start afterwards.
pub(crate) fn revoke(key: u64) {
    let loan = lock(loans()).remove(&key);
    if let Some(loan) = loan {
        lock(&loan.back).take();
        lock(&loan.front).take();
    }
}

fn find(key: u64) -> Option<Arc<Loan>> {
    lock(loans()).get(&key).cloned()
}

/// Runs `f` on the back part lent under `key`, which ends that part's loan; `None`
/// when nothing is lent under `key` (never lent, used or revoked).
pub(crate) fn with_lent<R>(key: u64, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    let loan = find(key)?;
    let mut back = lock(&loan.back);
    let r = back.as_ref().map(|r| r.with(f));
    back.take();
    r
}

/// Runs `f` on the front part lent under `key` by `owner`; `None` when nothing is lent
/// under `key`, or not by `owner`.
pub(crate) fn with_front<R>(key: u64, owner: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    let loan = find(key).filter(|l| l.owner == owner)?;
    let front = lock(&loan.front);
    front.as_ref().map(|r| r.with(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loan_is_used_once_and_not_after_revoke() {
        let mut buf = vec![0u8; 8];
        let key = u64::MAX - 1;
        // SAFETY: `buf` outlives the loan: revoked below before it is read.
        assert!(unsafe { lend(key, buf.as_mut_ptr(), buf.len(), 3, 1) });
        // SAFETY: same region, same key: refused, so nothing is lent twice.
        assert!(!unsafe { lend(key, buf.as_mut_ptr(), buf.len(), 3, 1) });
        assert_eq!(with_lent(key, |d| d.fill(7)), Some(()));
        assert_eq!(with_lent(key, |d| d.fill(9)), None, "the back is used once");
        assert_eq!(with_front(key, 2, |d| d.fill(8)), None, "another lender's");
        assert_eq!(with_front(key, 1, |d| d.fill(1)), Some(()));
        revoke(key);
        assert_eq!(buf, [1, 1, 1, 7, 7, 7, 7, 7]);

        // SAFETY: as above.
        assert!(unsafe { lend(key, buf.as_mut_ptr(), buf.len(), 3, 1) });
        revoke(key);
        assert_eq!(with_lent(key, |d| d.fill(9)), None, "revoked");
        assert_eq!(with_front(key, 1, |d| d.fill(9)), None, "revoked");
        assert_eq!(buf, [1, 1, 1, 7, 7, 7, 7, 7]);
    }

    /// The two parts are written at once by two threads, and a copy racing the revoke
    /// either runs whole before it or not at all (miri checks the locking and the
    /// disjointness: `.ci/run` runs these tests under it).
    #[test]
    fn both_parts_at_once_and_revoke_waits_for_a_copy_in_progress() {
        let mut buf = vec![0u8; 64];
        let key = u64::MAX - 2;
        // SAFETY: `buf` is neither read nor freed until `revoke` returned.
        assert!(unsafe { lend(key, buf.as_mut_ptr(), buf.len(), 32, 1) });
        let copier = std::thread::spawn(move || with_lent(key, |d| d.fill(3)).is_some());
        assert_eq!(with_front(key, 1, |d| d.fill(5)), Some(()));
        revoke(key);
        let copied = copier.join().unwrap();
        let back = if copied { 3 } else { 0 };
        assert!(buf[..32].iter().all(|&b| b == 5), "{buf:?}");
        assert!(buf[32..].iter().all(|&b| b == back), "{buf:?}");
    }
}
