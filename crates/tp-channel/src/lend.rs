//! Receive buffers lent to a helping sender in the same process (xth's help).
//!
//! A receiver whose sender offered help lends the back part of its buffer under the
//! sender's parking token ([`park`](crate::park)); the sender, asked to help, looks
//! the loan up by its own token and copies its bytes in. No address crosses the
//! connection: a request names a token, and a token reaches only a region its
//! receiver lent for it.
//!
//! A loan is used at most once, under its entry's lock, and [`revoke`] takes that lock
//! too: once `revoke` returns, no copy into the region is running or can start, so the
//! receiver may hand its buffer back. The receiver revokes when the sender answered,
//! or when it gives up waiting for the answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// A lent region: `len` bytes from `ptr`.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is written only through `with_lent`, by one thread at a time
// (under its entry's lock), while the lender keeps it valid (`lend`'s contract).
unsafe impl Send for Region {}

type Entry = Arc<Mutex<Option<Region>>>;

fn loans() -> &'static Mutex<HashMap<u64, Entry>> {
    static LOANS: OnceLock<Mutex<HashMap<u64, Entry>>> = OnceLock::new();
    LOANS.get_or_init(Mutex::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Lends `len` bytes from `ptr` under `key`; `false` (nothing lent) if `key` is lent
/// already.
///
/// # Safety
/// The region must stay valid for writes, and nothing else may read or write it, until
/// [`revoke`]`(key)` returns — or for ever, if it is never called.
pub(crate) unsafe fn lend(key: u64, ptr: *mut u8, len: usize) -> bool {
    let mut loans = lock(loans());
    if loans.contains_key(&key) {
        return false;
    }
    loans.insert(key, Arc::new(Mutex::new(Some(Region { ptr, len }))));
    true
}

/// Ends the loan under `key`: waits for a copy into it that is running, and none can
/// start afterwards.
pub(crate) fn revoke(key: u64) {
    let entry = lock(loans()).remove(&key);
    if let Some(entry) = entry {
        lock(&entry).take();
    }
}

/// Runs `f` on the region lent under `key`, which ends the loan; `None` when nothing
/// is lent under `key` (never lent, used or revoked).
pub(crate) fn with_lent<R>(key: u64, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    let entry = lock(loans()).get(&key).cloned()?;
    let mut region = lock(&entry);
    let r = region.as_ref().map(|r| {
        // SAFETY: the lender keeps the region valid and untouched until `revoke(key)`
        // returns, and `revoke` waits for this lock; we hold it, and the loan is used
        // once (taken below), so this is the only access.
        f(unsafe { std::slice::from_raw_parts_mut(r.ptr, r.len) })
    });
    region.take();
    drop(region);
    let mut loans = lock(loans());
    if loans.get(&key).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
        loans.remove(&key);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loan_is_used_once_and_not_after_revoke() {
        let mut buf = vec![0u8; 8];
        let key = u64::MAX - 1;
        // SAFETY: `buf` outlives the loan: revoked below before it is read.
        assert!(unsafe { lend(key, buf.as_mut_ptr(), buf.len()) });
        // SAFETY: same region, same key: refused, so nothing is lent twice.
        assert!(!unsafe { lend(key, buf.as_mut_ptr(), buf.len()) });
        assert_eq!(with_lent(key, |d| d.fill(7)), Some(()));
        assert_eq!(with_lent(key, |d| d.fill(9)), None, "a loan is used once");
        revoke(key);
        assert_eq!(buf, vec![7u8; 8]);

        // SAFETY: as above.
        assert!(unsafe { lend(key, buf.as_mut_ptr(), buf.len()) });
        revoke(key);
        assert_eq!(with_lent(key, |d| d.fill(9)), None, "revoked");
        assert_eq!(buf, vec![7u8; 8]);
    }

    /// A copy racing the revoke either runs whole before it or not at all (miri checks
    /// the locking: `.ci/run` runs these tests under it).
    #[test]
    fn revoke_waits_for_a_copy_in_progress() {
        let mut buf = vec![0u8; 64];
        let key = u64::MAX - 2;
        // SAFETY: `buf` is neither read nor freed until `revoke` returned.
        assert!(unsafe { lend(key, buf.as_mut_ptr(), buf.len()) });
        let copier = std::thread::spawn(move || with_lent(key, |d| d.fill(3)).is_some());
        revoke(key);
        let copied = copier.join().unwrap();
        let expect = if copied { 3 } else { 0 };
        assert!(buf.iter().all(|&b| b == expect), "{buf:?}");
    }
}
