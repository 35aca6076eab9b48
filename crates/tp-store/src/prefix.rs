//! [`PrefixStore`]: a namespace inside another store.

use std::string::String;
use std::sync::Arc;
use std::time::Duration;
use std::vec::Vec;

use crate::{Store, StoreError};

/// Every key becomes `prefix + "/" + key` in the wrapped store, as c10d's PrefixStore:
/// several users (the RPC agent, a process group) share one store without colliding.
/// Prefix stores nest. [`num_keys`](Store::num_keys) and the timeout are the wrapped
/// store's (upstream does the same).
#[derive(Clone)]
pub struct PrefixStore {
    prefix: String,
    inner: Arc<dyn Store>,
}

impl std::fmt::Debug for PrefixStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl PrefixStore {
    /// Wraps `inner` under `prefix`.
    pub fn new(prefix: impl Into<String>, inner: Arc<dyn Store>) -> Self {
        Self {
            prefix: prefix.into(),
            inner,
        }
    }

    /// The prefix (without the `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The wrapped store.
    pub fn underlying(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    fn key(&self, key: &str) -> String {
        std::format!("{}/{key}", self.prefix)
    }

    fn keys(&self, keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| self.key(k)).collect()
    }
}

/// Runs `f` with the prefixed keys as `&str`s.
fn with_keys<T>(
    owned: &[String],
    f: impl FnOnce(&[&str]) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
    f(&refs)
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(&self.key(key), value)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.inner.get(&self.key(key))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.inner.add(&self.key(key), delta)
    }

    fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.inner.compare_set(&self.key(key), expected, desired)
    }

    fn delete_key(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete_key(&self.key(key))
    }

    fn check(&self, keys: &[&str]) -> Result<bool, StoreError> {
        with_keys(&self.keys(keys), |k| self.inner.check(k))
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<(), StoreError> {
        with_keys(&self.keys(keys), |k| self.inner.wait(k, timeout))
    }

    fn num_keys(&self) -> Result<i64, StoreError> {
        self.inner.num_keys()
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.append(&self.key(key), value)
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>, StoreError> {
        with_keys(&self.keys(keys), |k| self.inner.multi_get(k))
    }

    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let keys: Vec<String> = pairs.iter().map(|(k, _)| self.key(k)).collect();
        let prefixed: Vec<(&str, &[u8])> = keys
            .iter()
            .zip(pairs)
            .map(|(k, (_, v))| (k.as_str(), *v))
            .collect();
        self.inner.multi_set(&prefixed)
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.queue_push(&self.key(key), value)
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>, StoreError> {
        self.inner.queue_pop(&self.key(key), block)
    }

    fn queue_len(&self, key: &str) -> Result<i64, StoreError> {
        self.inner.queue_len(&self.key(key))
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    fn set_timeout(&self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }
}
