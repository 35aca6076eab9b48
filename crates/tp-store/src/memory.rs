//! [`MemoryStore`]: an in-process store.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use std::vec::Vec;

use crate::data::Data;
use crate::store::{TimeoutCell, deadline};
use crate::{DEFAULT_TIMEOUT, Store, StoreError};

/// A store inside one process (c10d's HashStore): one mutex over the [`Data`] and one
/// condition variable that every write — set, add, append, compare-and-set, multi-set,
/// queue push — wakes (upstream's HashStore forgets `add`; this one does not).
#[derive(Debug)]
pub struct MemoryStore {
    data: Mutex<Data>,
    changed: Condvar,
    timeout: TimeoutCell,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store with the default timeout.
    pub fn new() -> Self {
        Self {
            data: Mutex::new(Data::new()),
            changed: Condvar::new(),
            timeout: TimeoutCell::new(DEFAULT_TIMEOUT),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes under the lock, then wakes every waiter.
    fn write<T>(&self, f: impl FnOnce(&mut Data) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.notify_all();
        out
    }

    /// Waits until `ready` holds, up to `timeout` (zero: forever), and returns the guard.
    fn wait_for<'a>(
        &'a self,
        op: &'static str,
        keys: &[&str],
        timeout: Duration,
        ready: impl Fn(&Data) -> bool,
    ) -> Result<MutexGuard<'a, Data>, StoreError> {
        let start = Instant::now();
        let end = deadline(timeout);
        let mut data = self.lock();
        while !ready(&data) {
            data = match end {
                None => self
                    .changed
                    .wait(data)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(end) => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(StoreError::timeout(op, keys, start.elapsed()));
                    }
                    self.changed
                        .wait_timeout(data, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        Ok(data)
    }
}

impl Store for MemoryStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|d| d.set(key.as_bytes(), value));
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let data = self.wait_for("get", &[key], self.timeout(), |d| {
            d.get(key.as_bytes()).is_some()
        })?;
        Ok(data.get(key.as_bytes()).unwrap_or_default().to_vec())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.write(|d| d.add(key.as_bytes(), delta))
            .map_err(|e| StoreError::NotANumber {
                key: key.into(),
                value: std::string::String::from_utf8_lossy(&e.value).into_owned(),
            })
    }

    fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        Ok(self.write(|d| d.compare_set(key.as_bytes(), expected, desired).0))
    }

    fn delete_key(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock().delete(key.as_bytes()))
    }

    fn check(&self, keys: &[&str]) -> Result<bool, StoreError> {
        let data = self.lock();
        Ok(keys.iter().all(|k| data.contains(k.as_bytes())))
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<(), StoreError> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        self.wait_for("wait", keys, timeout, |d| {
            keys.iter().all(|k| d.contains(k.as_bytes()))
        })
        .map(drop)
    }

    fn num_keys(&self) -> Result<i64, StoreError> {
        Ok(i64::try_from(self.lock().len()).unwrap_or(i64::MAX))
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|d| d.append(key.as_bytes(), value));
        Ok(())
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>, StoreError> {
        let data = self.wait_for("multi_get", keys, self.timeout(), |d| {
            keys.iter().all(|k| d.get(k.as_bytes()).is_some())
        })?;
        Ok(keys
            .iter()
            .map(|k| data.get(k.as_bytes()).unwrap_or_default().to_vec())
            .collect())
    }

    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<(), StoreError> {
        self.write(|d| {
            for (k, v) in pairs {
                d.set(k.as_bytes(), v);
            }
        });
        Ok(())
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|d| d.queue_push(key.as_bytes(), value));
        Ok(())
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>, StoreError> {
        let mut data = if block {
            self.wait_for("queue_pop", &[key], self.timeout(), |d| {
                d.queue_len(key.as_bytes()) > 0
            })?
        } else {
            self.lock()
        };
        data.queue_pop(key.as_bytes())
            .1
            .ok_or_else(|| StoreError::QueueEmpty { key: key.into() })
    }

    fn queue_len(&self, key: &str) -> Result<i64, StoreError> {
        Ok(self.lock().queue_len(key.as_bytes()))
    }

    fn timeout(&self) -> Duration {
        self.timeout.get()
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout.set(timeout);
    }
}
