//! The registration cache: whole GPU allocations registered with a NIC, kept for reuse,
//! the least recently used dropped first.
//!
//! Registering GPU memory with a NIC pins it through the peer-memory module and can take
//! milliseconds for a large allocation, so the cache registers outside its lock: other
//! channels' lookups go on meanwhile. Two lookups of the same unregistered allocation at
//! once may both register it; the first to come back is kept and the other's
//! registration is dropped (released) — rare, and never wrong.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Which allocation: its GPU and the driver's buffer id (never reused, so a freed
/// allocation's stale entry is never taken for a new one at the same address).
pub(super) type Key = (u32, u64);

/// The cache (see the [module docs](self)); `R` is the registration.
#[derive(Debug)]
pub(super) struct Lru<R> {
    capacity: usize,
    /// Least recently used first.
    entries: Mutex<VecDeque<(Key, Arc<R>)>>,
}

impl<R> Lru<R> {
    /// A cache of at most `capacity` entries (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::default(),
        }
    }

    /// The registration of `key`, made by `register` (without the lock held) if the
    /// cache has none. A transfer still using an evicted registration holds its own
    /// `Arc`, so eviction never pulls memory from under a read.
    ///
    /// # Errors
    /// `register`'s.
    pub(super) fn get<E>(
        &self,
        key: Key,
        register: impl FnOnce() -> Result<R, E>,
    ) -> Result<Arc<R>, E> {
        if let Some(hit) = self.settle(key, None) {
            return Ok(hit);
        }
        let made = Arc::new(register()?);
        // Someone else may have registered it meanwhile: theirs is kept, and ours is
        // released here, once the lock is no longer held.
        Ok(self.settle(key, Some(made.clone())).unwrap_or(made))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Key, Arc<R>)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Under one lock: makes `key`'s entry, or else `new`, the most recently used and
    /// returns it, evicting beyond the capacity; `None` if there is neither.
    fn settle(&self, key: Key, new: Option<Arc<R>>) -> Option<Arc<R>> {
        let mut entries = self.lock();
        let r = match entries.iter().position(|(k, _)| *k == key) {
            Some(at) => entries.remove(at).map(|(_, r)| r),
            None => new,
        }?;
        entries.push_back((key, r.clone()));
        while entries.len() > self.capacity {
            entries.pop_front();
        }
        Some(r)
    }

    #[cfg(test)]
    fn keys(&self) -> Vec<Key> {
        self.lock().iter().map(|(k, _)| *k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A registration that counts how many exist.
    struct Reg(&'static AtomicUsize, u64);

    impl Drop for Reg {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn reg(live: &'static AtomicUsize, id: u64) -> Result<Reg, String> {
        live.fetch_add(1, Ordering::Relaxed);
        Ok(Reg(live, id))
    }

    #[test]
    fn hits_reuse_misses_register_and_the_least_recent_goes_first() {
        static LIVE: AtomicUsize = AtomicUsize::new(0);
        let lru = Lru::new(2);
        let a = lru.get((0, 1), || reg(&LIVE, 1)).unwrap();
        let again = lru.get((0, 1), || -> Result<Reg, String> {
            panic!("a hit registers")
        });
        assert!(Arc::ptr_eq(&a, &again.unwrap()));
        // The same buffer id on another GPU is another allocation.
        let b = lru.get((1, 1), || reg(&LIVE, 2)).unwrap();
        assert_eq!(b.1, 2);
        assert_eq!(LIVE.load(Ordering::Relaxed), 2);
        // A hit on (0, 1) makes (1, 1) the least recent: a third entry evicts it.
        lru.get((0, 1), || reg(&LIVE, 9)).unwrap();
        lru.get((0, 2), || reg(&LIVE, 3)).unwrap();
        assert_eq!(lru.keys(), [(0, 1), (0, 2)]);
        // The evicted registration lives while a transfer holds it, then goes.
        assert_eq!(LIVE.load(Ordering::Relaxed), 3);
        drop(b);
        assert_eq!(LIVE.load(Ordering::Relaxed), 2);
        drop((a, lru));
        assert_eq!(LIVE.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failed_registration_caches_nothing_and_says_why() {
        let lru: Lru<u8> = Lru::new(4);
        assert_eq!(lru.get((0, 1), || Err("no")), Err("no"));
        assert!(lru.keys().is_empty());
        assert_eq!(*lru.get((0, 1), || Ok::<_, &str>(7)).unwrap(), 7);
        // Capacity 0 is taken as 1.
        let one: Lru<u8> = Lru::new(0);
        one.get((0, 1), || Ok::<_, ()>(1)).unwrap();
        one.get((0, 2), || Ok::<_, ()>(2)).unwrap();
        assert_eq!(one.keys(), [(0, 2)]);
    }

    #[test]
    fn a_registration_that_raced_another_keeps_one_and_releases_the_other() {
        static LIVE: AtomicUsize = AtomicUsize::new(0);
        let lru = Lru::new(4);
        // While this lookup registers (outside the lock), another one for the same
        // allocation registers and comes back first.
        let got = lru
            .get((0, 5), || {
                let first = lru.get((0, 5), || reg(&LIVE, 1)).unwrap();
                drop(first);
                reg(&LIVE, 2)
            })
            .unwrap();
        assert_eq!(got.1, 1, "the first registration back is kept");
        assert_eq!(lru.keys(), [(0, 5)]);
        assert_eq!(
            LIVE.load(Ordering::Relaxed),
            1,
            "the other one was released"
        );
        // Lookups of other allocations are not held up by a registration under way
        // (with the lock held while registering, this would deadlock).
        let other = lru.get((0, 6), || {
            assert_eq!(lru.get((0, 7), || reg(&LIVE, 7)).unwrap().1, 7);
            reg(&LIVE, 6)
        });
        assert_eq!(other.unwrap().1, 6);
        assert_eq!(lru.keys(), [(0, 5), (0, 7), (0, 6)]);
    }
}
