//! The [`Store`] trait: c10d's key-value store API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use std::vec::Vec;

use crate::StoreError;

/// The timeout every store starts with: 300 s, as c10d's `kDefaultTimeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// c10d's key-value store, as PyTorch's `torch.distributed.Store` offers it.
///
/// Keys are strings; values are bytes. Every blocking operation (`get`, `wait`,
/// `multi_get`, a blocking `queue_pop`) waits at most the store's timeout
/// ([`timeout`](Self::timeout), default [`DEFAULT_TIMEOUT`]), or the timeout it is
/// given. **A timeout of zero means "wait forever"**, as c10d's base class documents
/// (`kNoTimeout`); a wait that must not block at all is [`check`](Self::check).
///
/// Counters are decimal ASCII (`add("c", 5)` stores `"5"`), so they interoperate with
/// PyTorch's stores. Implementations are thread-safe; operations from one thread
/// complete in the order issued.
pub trait Store: Send + Sync {
    /// Stores `value` under `key`, replacing what was there, and wakes the key's
    /// waiters.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// The value under `key`, waiting up to the timeout for it to appear.
    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError>;

    /// Adds `delta` to the counter under `key` (a missing key counts as 0); returns the
    /// new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError>;

    /// Compare-and-set with c10d's semantics: a missing key with an empty `expected` is
    /// set to `desired`; a missing key with a non-empty `expected` is left missing and
    /// `expected` is returned; an existing key is set to `desired` only if it holds
    /// `expected`. Returns the value now stored (or `expected`, as said).
    fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError>;

    /// Deletes `key`; whether it existed.
    fn delete_key(&self, key: &str) -> Result<bool, StoreError>;

    /// Whether every key exists, without waiting.
    fn check(&self, keys: &[&str]) -> Result<bool, StoreError>;

    /// Waits until every key exists: up to `timeout`, or the store's timeout when
    /// `None` (zero: forever).
    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<(), StoreError>;

    /// How many keys the store holds (for a [`PrefixStore`](crate::PrefixStore), the
    /// whole underlying store's count, as upstream).
    fn num_keys(&self) -> Result<i64, StoreError>;

    /// Appends `value` to the value under `key` (creating it).
    fn append(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// The values of `keys`, in order, waiting up to the timeout for all of them.
    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Stores every pair.
    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<(), StoreError>;

    /// Pushes `value` onto the queue `key` (queues live apart from values).
    fn queue_push(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Pops the oldest value of the queue `key`. With `block`, waits up to the timeout
    /// for one; without, an empty queue is [`StoreError::QueueEmpty`].
    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>, StoreError>;

    /// The length of the queue `key`.
    fn queue_len(&self, key: &str) -> Result<i64, StoreError>;

    /// The timeout blocking operations use.
    fn timeout(&self) -> Duration;

    /// Changes the timeout blocking operations use (zero: forever).
    fn set_timeout(&self, timeout: Duration);
}

/// A store's timeout, changeable through `&self`.
#[derive(Debug)]
pub(crate) struct TimeoutCell(AtomicU64);

impl TimeoutCell {
    pub(crate) fn new(t: Duration) -> Self {
        Self(AtomicU64::new(nanos(t)))
    }

    pub(crate) fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    pub(crate) fn set(&self, t: Duration) {
        self.0.store(nanos(t), Ordering::Relaxed);
    }
}

fn nanos(t: Duration) -> u64 {
    u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)
}

/// When a wait of `timeout` started now ends; `None` for zero (forever) or a timeout
/// too long to represent.
pub(crate) fn deadline(timeout: Duration) -> Option<Instant> {
    if timeout.is_zero() {
        None
    } else {
        Instant::now().checked_add(timeout)
    }
}

/// A number in [0, 1) that differs between calls and processes (for back-off jitter;
/// not for anything that needs real randomness).
pub(crate) fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// What is left of `timeout` (zero: forever) since `start`, as a timeout to wait with:
/// zero again for forever, `None` once it has run out.
pub(crate) fn time_left(timeout: Duration, start: Instant) -> Option<Duration> {
    if timeout.is_zero() {
        return Some(Duration::ZERO);
    }
    let left = timeout.saturating_sub(start.elapsed());
    (!left.is_zero()).then_some(left)
}

/// `current` (a stored counter, or none) plus `delta`: the sum and the bytes to store.
///
/// # Errors
/// [`StoreError::NotANumber`]: the stored value is not a decimal `i64`, or the sum
/// overflows.
pub(crate) fn add_counter(
    key: &str,
    current: Option<&[u8]>,
    delta: i64,
) -> Result<(i64, Vec<u8>), StoreError> {
    let current = match current {
        None => 0,
        Some(v) => crate::data::parse_counter(v).ok_or_else(|| StoreError::NotANumber {
            key: key.into(),
            value: std::string::String::from_utf8_lossy(v)
                .chars()
                .take(64)
                .collect(),
        })?,
    };
    let sum = current
        .checked_add(delta)
        .ok_or_else(|| StoreError::NotANumber {
            key: key.into(),
            value: std::format!("{current}"),
        })?;
    Ok((sum, std::format!("{sum}").into_bytes()))
}
