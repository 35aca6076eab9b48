//! [`Data`]: what a store holds — values and queues — and the c10d semantics of every
//! operation on them, with no locking, waiting or I/O. The memory store puts it behind
//! a mutex; the TCP server ([`crate::serve`]) owns one.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::fmt;

/// An ADD on a value that is not a decimal number, or a sum out of `i64`'s range.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct NotANumber {
    /// What the key holds (at most 64 bytes of it).
    pub value: Vec<u8>,
    /// The delta that was to be added.
    pub delta: i64,
}

impl fmt::Display for NotANumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot add {} to {:?}: not a decimal i64, or the sum overflows",
            self.delta,
            alloc::string::String::from_utf8_lossy(&self.value)
        )
    }
}

impl core::error::Error for NotANumber {}

/// Parses a counter as C's `stoll` does (leading spaces, a sign, at least one digit;
/// anything after the digits is ignored), without its overflow: `None` then.
pub fn parse_counter(bytes: &[u8]) -> Option<i64> {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = bytes.get(start..)?;
    let (negative, digits) = match rest.first() {
        Some(b'-') => (true, rest.get(1..)?),
        Some(b'+') => (false, rest.get(1..)?),
        _ => (false, rest),
    };
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits.get(..len)? {
        let d = i64::from(d - b'0');
        n = n.checked_mul(10)?;
        n = if negative {
            n.checked_sub(d)?
        } else {
            n.checked_add(d)?
        };
    }
    Some(n)
}

/// A store's contents: a map of values and a map of queues (c10d keeps them apart: a
/// key may name a value and a queue at once).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Data {
    values: BTreeMap<Vec<u8>, Vec<u8>>,
    queues: BTreeMap<Vec<u8>, VecDeque<Vec<u8>>>,
}

impl Data {
    /// An empty store.
    pub const fn new() -> Self {
        Self {
            values: BTreeMap::new(),
            queues: BTreeMap::new(),
        }
    }

    /// Stores `value` under `key`.
    pub fn set(&mut self, key: &[u8], value: &[u8]) {
        match self.values.get_mut(key) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(value);
            }
            None => {
                self.values.insert(key.to_vec(), value.to_vec());
            }
        }
    }

    /// The value under `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.values.get(key).map(Vec::as_slice)
    }

    /// Adds `delta` to the decimal counter under `key` (a missing key counts as 0) and
    /// returns the new value, stored as decimal ASCII.
    ///
    /// # Errors
    /// [`NotANumber`]: the value is not a decimal `i64`, or the sum overflows; nothing
    /// changes.
    pub fn add(&mut self, key: &[u8], delta: i64) -> Result<i64, NotANumber> {
        let current = match self.values.get(key) {
            None => 0,
            Some(v) => parse_counter(v).ok_or_else(|| NotANumber {
                value: v.iter().copied().take(64).collect(),
                delta,
            })?,
        };
        let sum = current.checked_add(delta).ok_or_else(|| NotANumber {
            value: alloc::format!("{current}").into_bytes(),
            delta,
        })?;
        self.set(key, alloc::format!("{sum}").as_bytes());
        Ok(sum)
    }

    /// c10d's compare-and-set. A missing key with an empty `expected` gets `desired`; a
    /// missing key with a non-empty `expected` stays missing and `expected` is returned
    /// (upstream's documented behaviour); an existing key gets `desired` only when it
    /// holds `expected`. Returns the value now stored (or `expected`, see above) and
    /// whether anything was written.
    pub fn compare_set(&mut self, key: &[u8], expected: &[u8], desired: &[u8]) -> (Vec<u8>, bool) {
        match self.values.get_mut(key) {
            None if expected.is_empty() => {
                self.values.insert(key.to_vec(), desired.to_vec());
                (desired.to_vec(), true)
            }
            None => (expected.to_vec(), false),
            Some(v) if v.as_slice() == expected => {
                v.clear();
                v.extend_from_slice(desired);
                (desired.to_vec(), true)
            }
            Some(v) => (v.clone(), false),
        }
    }

    /// Removes the value under `key`; whether there was one.
    pub fn delete(&mut self, key: &[u8]) -> bool {
        self.values.remove(key).is_some()
    }

    /// Whether `key` holds a value or a non-empty queue (what CHECK and WAIT look for).
    pub fn contains(&self, key: &[u8]) -> bool {
        self.values.contains_key(key) || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    /// Appends `value` to the value under `key` (creating it).
    pub fn append(&mut self, key: &[u8], value: &[u8]) {
        match self.values.get_mut(key) {
            Some(v) => v.extend_from_slice(value),
            None => {
                self.values.insert(key.to_vec(), value.to_vec());
            }
        }
    }

    /// How many values (queues are not counted, as upstream).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no value is stored.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The keys of every value, in byte order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.values.keys().map(Vec::as_slice)
    }

    /// Pushes `value` onto the queue `key`.
    pub fn queue_push(&mut self, key: &[u8], value: &[u8]) {
        match self.queues.get_mut(key) {
            Some(q) => q.push_back(value.to_vec()),
            None => {
                self.queues
                    .insert(key.to_vec(), VecDeque::from([value.to_vec()]));
            }
        }
    }

    /// Pops the oldest value of the queue `key`: the length before the pop and the
    /// value (none when the queue was empty or missing).
    pub fn queue_pop(&mut self, key: &[u8]) -> (i64, Option<Vec<u8>>) {
        let Some(q) = self.queues.get_mut(key) else {
            return (0, None);
        };
        let before = i64::try_from(q.len()).unwrap_or(i64::MAX);
        let value = q.pop_front();
        if q.is_empty() {
            self.queues.remove(key);
        }
        (before, value)
    }

    /// The length of the queue `key` (0 when missing).
    pub fn queue_len(&self, key: &[u8]) -> i64 {
        self.queues
            .get(key)
            .map_or(0, |q| i64::try_from(q.len()).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counters_parse_as_stoll_does() {
        assert_eq!(parse_counter(b"5"), Some(5));
        assert_eq!(parse_counter(b"  -12abc"), Some(-12));
        assert_eq!(parse_counter(b"+7"), Some(7));
        assert_eq!(parse_counter(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_counter(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_counter(b"9223372036854775808"), None);
        assert_eq!(parse_counter(b""), None);
        assert_eq!(parse_counter(b"-"), None);
        assert_eq!(parse_counter(b"abc"), None);
    }

    #[test]
    fn add_counts_from_zero_stores_text_and_refuses_non_numbers() {
        let mut d = Data::new();
        assert_eq!(d.add(b"c", 5), Ok(5));
        assert_eq!(d.add(b"c", -7), Ok(-2));
        assert_eq!(d.get(b"c"), Some(&b"-2"[..]));
        d.set(b"s", b"hello");
        assert!(d.add(b"s", 1).is_err());
        assert_eq!(d.get(b"s"), Some(&b"hello"[..]), "unchanged");
        d.set(b"m", b"9223372036854775807");
        assert!(d.add(b"m", 1).is_err());
    }

    #[test]
    fn compare_set_follows_c10d_including_the_missing_key_cases() {
        let mut d = Data::new();
        // Missing, expected non-empty: returns expected, sets nothing.
        assert_eq!(d.compare_set(b"k", b"x", b"y"), (b"x".to_vec(), false));
        assert_eq!(d.get(b"k"), None);
        // Missing, expected empty: sets desired.
        assert_eq!(d.compare_set(b"k", b"", b"v1"), (b"v1".to_vec(), true));
        // Present, mismatch: returns current.
        assert_eq!(d.compare_set(b"k", b"nope", b"v2"), (b"v1".to_vec(), false));
        // Present, match.
        assert_eq!(d.compare_set(b"k", b"v1", b"v2"), (b"v2".to_vec(), true));
        assert_eq!(d.get(b"k"), Some(&b"v2"[..]));
    }

    #[test]
    fn queues_are_fifo_apart_from_values_and_count_for_contains() {
        let mut d = Data::new();
        assert_eq!(d.queue_pop(b"q"), (0, None));
        assert!(!d.contains(b"q"));
        d.queue_push(b"q", b"1");
        d.queue_push(b"q", b"2");
        assert!(d.contains(b"q"));
        assert_eq!(d.len(), 0, "queues are not values");
        assert_eq!(d.queue_len(b"q"), 2);
        assert_eq!(d.queue_pop(b"q"), (2, Some(b"1".to_vec())));
        assert_eq!(d.queue_pop(b"q"), (1, Some(b"2".to_vec())));
        assert_eq!(d.queue_pop(b"q"), (0, None));
        assert!(!d.contains(b"q"));
    }

    proptest! {
        #[test]
        fn counters_round_trip(n in any::<i64>()) {
            prop_assert_eq!(parse_counter(alloc::format!("{n}").as_bytes()), Some(n));
        }

        #[test]
        fn add_sums_like_i64(steps in proptest::collection::vec(-1000i64..1000, 0..50)) {
            let mut d = Data::new();
            let mut want = 0i64;
            for s in steps {
                want += s;
                prop_assert_eq!(d.add(b"k", s), Ok(want));
            }
        }
    }
}
