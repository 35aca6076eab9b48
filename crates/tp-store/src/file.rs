//! [`FileStore`]: a store in a shared file, in PyTorch's FileStore format.
//!
//! The file is an append-only log of records — a `u32` key length (native byte order),
//! the key, a `u32` value length, the value. Every user key is written with a leading
//! `/`; deleting `k` appends the tombstone key `-/k` with an empty value. Writers hold
//! `flock(LOCK_EX)`, readers `LOCK_SH`; each handle keeps the values it has replayed
//! and the offset it replayed to, and reads only what was appended since. Blocking
//! operations poll every 10 ms (inotify does not work on NFS, where such files often
//! live). So PyTorch processes and tp processes can share one file.
//!
//! Beyond upstream: queues (PyTorch's FileStore has none) live under keys that start
//! with `queue/` — never a user key, which always starts with `/` — whose value is the
//! queue's items, each a `u64` length and the bytes.
//!
//! Clean-up as upstream: each handle, when dropped, adds 1 to `cleanup/`, and the one
//! that brings it to the number of workers deletes the file (`None`: never).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use std::vec::Vec;

use rustix::fs::{FlockOperation, flock};

use crate::store::{TimeoutCell, add_counter, deadline, time_left};
use crate::{DEFAULT_TIMEOUT, Store, StoreError};

const POLL: Duration = Duration::from_millis(10);
const CLEANUP_KEY: &[u8] = b"cleanup/";
/// Longest key or value a record may announce (a corrupt length must not allocate).
const MAX_FIELD: u32 = 1 << 30;

/// The replayed state of the file.
#[derive(Debug, Default)]
struct Cache {
    values: HashMap<Vec<u8>, Vec<u8>>,
    /// How far the file was replayed.
    offset: u64,
}

/// A store in a shared file (see the module docs).
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: Mutex<(File, Cache)>,
    num_workers: Option<usize>,
    timeout: TimeoutCell,
}

/// Holds a `flock` on the file until dropped.
struct Locked<'a>(&'a File);

impl<'a> Locked<'a> {
    fn new(file: &'a File, op: FlockOperation) -> std::io::Result<Self> {
        loop {
            match flock(file, op) {
                Ok(()) => return Ok(Self(file)),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, FlockOperation::Unlock);
    }
}

fn user_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(b'/');
    k.extend_from_slice(key.as_bytes());
    k
}

fn queue_key(key: &str) -> Vec<u8> {
    let mut k = b"queue/".to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode_queue(v: &[u8]) -> Vec<Vec<u8>> {
    let mut items = Vec::new();
    let mut rest = v;
    while let Some((len, tail)) = rest.split_first_chunk::<8>() {
        let Ok(len) = usize::try_from(u64::from_le_bytes(*len)) else {
            break;
        };
        let Some((item, tail)) = tail.split_at_checked(len) else {
            break;
        };
        items.push(item.to_vec());
        rest = tail;
    }
    items
}

fn encode_queue<'a>(items: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in items {
        out.extend_from_slice(&(i.len() as u64).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

impl FileStore {
    /// Opens (creating it if needed) the store file at `path`, shared by `num_workers`
    /// handles (`None`: the file is never deleted).
    ///
    /// # Errors
    /// [`StoreError::Io`]: the file cannot be opened or created.
    pub fn new(path: impl AsRef<Path>, num_workers: Option<usize>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self {
            path,
            file: Mutex::new((file, Cache::default())),
            num_workers,
            timeout: TimeoutCell::new(DEFAULT_TIMEOUT),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn lock(&self) -> MutexGuard<'_, (File, Cache)> {
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replays records appended since the last look (the caller holds a flock).
    fn refresh(&self, mut file: &File, cache: &mut Cache) -> Result<(), StoreError> {
        let end = file.seek(SeekFrom::End(0)).map_err(|e| self.io(e))?;
        if end <= cache.offset {
            return Ok(());
        }
        file.seek(SeekFrom::Start(cache.offset))
            .map_err(|e| self.io(e))?;
        let mut bytes = Vec::new();
        file.take(end - cache.offset)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io(e))?;
        let mut at = 0usize;
        let field = |at: &mut usize| -> Option<Vec<u8>> {
            let len = bytes.get(*at..*at + 4)?;
            let len = u32::from_ne_bytes(len.try_into().ok()?);
            if len > MAX_FIELD {
                return None;
            }
            let start = *at + 4;
            let v = bytes.get(start..start + len as usize)?.to_vec();
            *at = start + len as usize;
            Some(v)
        };
        loop {
            let mut next = at;
            let Some(key) = field(&mut next) else { break };
            let Some(value) = field(&mut next) else { break };
            at = next;
            match key.split_first() {
                Some((b'-', rest)) => {
                    cache.values.remove(rest);
                }
                _ => {
                    cache.values.insert(key, value);
                }
            }
        }
        // A record still being written (or a torn tail) is read again next time.
        cache.offset += at as u64;
        Ok(())
    }

    fn write_record(&self, mut file: &File, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let too_big = |n: usize| u32::try_from(n).ok().filter(|&n| n <= MAX_FIELD).is_none();
        if too_big(key.len()) || too_big(value.len()) {
            return Err(StoreError::TooLarge {
                key: String::from_utf8_lossy(key).into_owned(),
                what: "key or value length",
                len: key.len().max(value.len()) as u64,
                limit: u64::from(MAX_FIELD),
            });
        }
        let mut rec = Vec::with_capacity(8 + key.len() + value.len());
        rec.extend_from_slice(&(key.len() as u32).to_ne_bytes());
        rec.extend_from_slice(key);
        rec.extend_from_slice(&(value.len() as u32).to_ne_bytes());
        rec.extend_from_slice(value);
        file.write_all(&rec).map_err(|e| self.io(e))
    }

    /// Reads under a shared lock.
    fn read<T>(&self, f: impl FnOnce(&Cache) -> T) -> Result<T, StoreError> {
        let mut guard = self.lock();
        let (file, cache) = &mut *guard;
        let file = &*file;
        let _l = Locked::new(file, FlockOperation::LockShared).map_err(|e| self.io(e))?;
        self.refresh(file, cache)?;
        Ok(f(cache))
    }

    /// Reads, decides and appends under an exclusive lock: `f` returns the result and
    /// the records to append.
    fn update<T>(
        &self,
        f: impl FnOnce(&Cache) -> Result<(T, Vec<(Vec<u8>, Vec<u8>)>), StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.lock();
        let (file, cache) = &mut *guard;
        let file = &*file;
        let _l = Locked::new(file, FlockOperation::LockExclusive).map_err(|e| self.io(e))?;
        self.refresh(file, cache)?;
        let (out, records) = f(cache)?;
        for (k, v) in &records {
            self.write_record(file, k, v)?;
        }
        // Our own records are replayed like anyone's (keeps the offset exact).
        self.refresh(file, cache)?;
        Ok(out)
    }

    /// Polls until `ready` (every 10 ms), up to `timeout` (zero: forever).
    fn poll_until(
        &self,
        op: &'static str,
        keys: &[&str],
        timeout: Duration,
        ready: impl Fn(&Cache) -> bool,
    ) -> Result<(), StoreError> {
        let start = Instant::now();
        let end = deadline(timeout);
        loop {
            if self.read(&ready)? {
                return Ok(());
            }
            if end.is_some_and(|e| Instant::now() >= e) {
                return Err(StoreError::timeout(op, keys, start.elapsed()));
            }
            std::thread::sleep(POLL);
        }
    }

    fn add_raw(&self, key: &[u8], delta: i64, shown: &str) -> Result<i64, StoreError> {
        self.update(|c| {
            let (sum, bytes) = add_counter(shown, c.values.get(key).map(Vec::as_slice), delta)?;
            Ok((sum, std::vec![(key.to_vec(), bytes)]))
        })
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        let Some(n) = self.num_workers else { return };
        match self.add_raw(CLEANUP_KEY, 1, "cleanup/") {
            Ok(done) if usize::try_from(done).is_ok_and(|d| d >= n) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("file store: clean-up count failed: {e}"),
        }
    }
}

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.update(|_| Ok(((), std::vec![(user_key(key), value.to_vec())])))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let k = user_key(key);
        self.poll_until("get", &[key], self.timeout(), |c| c.values.contains_key(&k))?;
        self.read(|c| c.values.get(&k).cloned().unwrap_or_default())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.add_raw(&user_key(key), delta, key)
    }

    fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let k = user_key(key);
        self.update(|c| {
            Ok(match c.values.get(&k) {
                None if expected.is_empty() => {
                    (desired.to_vec(), std::vec![(k.clone(), desired.to_vec())])
                }
                None => (expected.to_vec(), Vec::new()),
                Some(v) if v.as_slice() == expected => {
                    (desired.to_vec(), std::vec![(k.clone(), desired.to_vec())])
                }
                Some(v) => (v.clone(), Vec::new()),
            })
        })
    }

    fn delete_key(&self, key: &str) -> Result<bool, StoreError> {
        let k = user_key(key);
        self.update(|c| {
            if c.values.contains_key(&k) {
                let mut tomb = std::vec![b'-'];
                tomb.extend_from_slice(&k);
                Ok((true, std::vec![(tomb, Vec::new())]))
            } else {
                Ok((false, Vec::new()))
            }
        })
    }

    fn check(&self, keys: &[&str]) -> Result<bool, StoreError> {
        self.read(|c| {
            keys.iter().all(|k| {
                c.values.contains_key(&user_key(k))
                    || c.values.get(&queue_key(k)).is_some_and(|q| !q.is_empty())
            })
        })
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<(), StoreError> {
        let wanted: Vec<Vec<u8>> = keys.iter().map(|k| user_key(k)).collect();
        self.poll_until(
            "wait",
            keys,
            timeout.unwrap_or_else(|| self.timeout()),
            |c| wanted.iter().all(|k| c.values.contains_key(k)),
        )
    }

    fn num_keys(&self) -> Result<i64, StoreError> {
        self.read(|c| i64::try_from(c.values.len()).unwrap_or(i64::MAX))
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let k = user_key(key);
        self.update(|c| {
            let mut v = c.values.get(&k).cloned().unwrap_or_default();
            v.extend_from_slice(value);
            Ok(((), std::vec![(k.clone(), v)]))
        })
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>, StoreError> {
        let wanted: Vec<Vec<u8>> = keys.iter().map(|k| user_key(k)).collect();
        self.poll_until("multi_get", keys, self.timeout(), |c| {
            wanted.iter().all(|k| c.values.contains_key(k))
        })?;
        self.read(|c| {
            wanted
                .iter()
                .map(|k| c.values.get(k).cloned().unwrap_or_default())
                .collect()
        })
    }

    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<(), StoreError> {
        self.update(|_| {
            Ok((
                (),
                pairs
                    .iter()
                    .map(|(k, v)| (user_key(k), v.to_vec()))
                    .collect(),
            ))
        })
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let k = queue_key(key);
        self.update(|c| {
            let mut q = c.values.get(&k).cloned().unwrap_or_default();
            q.extend_from_slice(&(value.len() as u64).to_le_bytes());
            q.extend_from_slice(value);
            Ok(((), std::vec![(k.clone(), q)]))
        })
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>, StoreError> {
        let k = queue_key(key);
        let start = Instant::now();
        let timeout = self.timeout();
        loop {
            if block {
                let left = time_left(timeout, start)
                    .ok_or_else(|| StoreError::timeout("queue_pop", &[key], start.elapsed()))?;
                self.poll_until("queue_pop", &[key], left, |c| {
                    c.values.get(&k).is_some_and(|q| !q.is_empty())
                })?;
            }
            let popped = self.update(|c| {
                let items = decode_queue(c.values.get(&k).map_or(&[][..], Vec::as_slice));
                let Some((first, rest)) = items.split_first() else {
                    return Ok((None, Vec::new()));
                };
                let rest = encode_queue(rest.iter().map(Vec::as_slice));
                Ok((Some(first.clone()), std::vec![(k.clone(), rest)]))
            })?;
            match popped {
                Some(v) => return Ok(v),
                None if block => {}
                None => return Err(StoreError::QueueEmpty { key: key.into() }),
            }
        }
    }

    fn queue_len(&self, key: &str) -> Result<i64, StoreError> {
        let k = queue_key(key);
        self.read(|c| {
            let n = c.values.get(&k).map_or(0, |q| decode_queue(q).len());
            i64::try_from(n).unwrap_or(i64::MAX)
        })
    }

    fn timeout(&self) -> Duration {
        self.timeout.get()
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout.set(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(std::format!("tp-filestore-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&(key.len() as u32).to_ne_bytes());
        r.extend_from_slice(key);
        r.extend_from_slice(&(value.len() as u32).to_ne_bytes());
        r.extend_from_slice(value);
        r
    }

    #[test]
    fn the_file_holds_pytorchs_records_and_tombstones() {
        let path = temp("format");
        let s = FileStore::new(&path, None).unwrap();
        s.set("k", b"v").unwrap();
        s.add("c", 5).unwrap();
        assert!(s.delete_key("k").unwrap());
        let want = [
            record(b"/k", b"v"),
            record(b"/c", b"5"),
            record(b"-/k", b""),
        ]
        .concat();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        drop(s);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_file_written_by_another_process_is_replayed() {
        // What PyTorch would have written: a key, an overwrite, a deleted key.
        let path = temp("replay");
        let bytes = [
            record(b"/a", b"1"),
            record(b"/b", b"x"),
            record(b"/a", b"2"),
            record(b"-/b", b""),
        ]
        .concat();
        std::fs::write(&path, bytes).unwrap();
        let s = FileStore::new(&path, None).unwrap();
        assert_eq!(s.get("a").unwrap(), b"2");
        assert!(!s.check(&["b"]).unwrap());
        assert_eq!(s.num_keys().unwrap(), 1);
        // A torn record at the end (a writer mid-append) is left for later.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let rec = record(b"/late", b"value");
        f.write_all(&rec[..7]).unwrap();
        assert!(!s.check(&["late"]).unwrap());
        f.write_all(&rec[7..]).unwrap();
        assert_eq!(s.get("late").unwrap(), b"value");
        drop(s);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_corrupt_length_allocates_nothing_and_reads_as_incomplete() {
        let path = temp("corrupt");
        let mut bytes = record(b"/a", b"1");
        bytes.extend_from_slice(&u32::MAX.to_ne_bytes());
        std::fs::write(&path, bytes).unwrap();
        let s = FileStore::new(&path, None).unwrap();
        assert_eq!(s.get("a").unwrap(), b"1");
        drop(s);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_last_of_the_workers_deletes_the_file() {
        let path = temp("cleanup");
        let a = FileStore::new(&path, Some(2)).unwrap();
        let b = FileStore::new(&path, Some(2)).unwrap();
        a.set("k", b"v").unwrap();
        drop(a);
        assert!(path.exists(), "one worker is still there");
        assert_eq!(b.get("k").unwrap(), b"v");
        drop(b);
        assert!(!path.exists(), "the second drop removed it");
        // None: never deleted.
        let c = FileStore::new(&path, None).unwrap();
        drop(c);
        assert!(path.exists());
        let _ = std::fs::remove_file(&path);
    }
}
