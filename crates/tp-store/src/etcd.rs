//! [`EtcdStore`]: a store on an etcd v3 cluster, for deployments that outgrow one store
//! server (etcd replicates; a TCPStore server is a single point of failure).
//!
//! It speaks etcd's JSON gateway (`POST /v3/kv/...`, keys and values base64) over
//! plain HTTP/1.1 with keep-alive, so it needs no gRPC stack. Layout under the
//! store's namespace `ns`:
//!
//! | what | etcd key |
//! |---|---|
//! | value of `k` | `ns` + `kv/` + `k` |
//! | item of queue `k` | `ns` + `q/` + `k` + `/` + a unique id (ordered by creation revision) |
//!
//! Read-modify-writes (`add`, `append`, `compare_set`, a queue pop) are etcd
//! transactions guarded by the key's modification revision, retried when another
//! client got there first. Blocking operations poll every 10 ms (a watch would save
//! the polls, at the cost of a streaming HTTP reader).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::string::{String, ToString};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use std::vec::Vec;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::store::{TimeoutCell, add_counter, deadline};
use crate::{DEFAULT_TIMEOUT, Store, StoreError};

const POLL: Duration = Duration::from_millis(10);
/// Most bytes a reply may announce (values are at most a few MiB, base64-encoded).
const MAX_REPLY: usize = 256 << 20;
/// Most bytes of reply headers.
const MAX_HEADERS: usize = 64 << 10;

/// A store on etcd v3 (see the module docs).
pub struct EtcdStore {
    /// `host:port` of the etcd member.
    addr: String,
    namespace: Vec<u8>,
    conn: Mutex<Option<BufReader<TcpStream>>>,
    timeout: TimeoutCell,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("addr", &self.addr)
            .field("namespace", &String::from_utf8_lossy(&self.namespace))
            .finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    std::vec![0] // every key
}

/// An i64 that etcd's JSON sends as a string (proto3 int64), or absent = 0.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// One key-value of a range reply.
struct Kv {
    key: Vec<u8>,
    value: Vec<u8>,
    mod_revision: i64,
}

impl EtcdStore {
    /// Connects to the etcd member at `endpoint` (`http://host:port` or `host:port`)
    /// and keeps every key under `namespace` (e.g. `"tp/job-42/"`), retrying until the
    /// default timeout.
    ///
    /// # Errors
    /// [`StoreError::Network`]: no etcd answered in time; [`StoreError::Backend`]:
    /// something answered, but not as etcd does.
    pub fn connect(endpoint: &str, namespace: &str) -> Result<Self, StoreError> {
        Self::connect_with_timeout(endpoint, namespace, DEFAULT_TIMEOUT)
    }

    /// [`connect`](Self::connect) with a store timeout (also the connect deadline).
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub fn connect_with_timeout(
        endpoint: &str,
        namespace: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let addr = endpoint
            .strip_prefix("http://")
            .unwrap_or(endpoint)
            .trim_end_matches('/')
            .to_string();
        let store = Self {
            addr,
            namespace: namespace.as_bytes().to_vec(),
            conn: Mutex::new(None),
            timeout: TimeoutCell::new(timeout),
        };
        // Any request proves etcd is there; retry until the timeout.
        let start = Instant::now();
        let end = deadline(timeout);
        let mut delay = Duration::from_millis(50);
        loop {
            match store.num_keys() {
                Ok(_) => return Ok(store),
                Err(e @ StoreError::Network { .. }) => {
                    if end.is_some_and(|e| Instant::now() + delay >= e) {
                        return Err(store.network(std::format!(
                            "no etcd after {:.1} s: {e}",
                            start.elapsed().as_secs_f64()
                        )));
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 3 / 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn value_key(&self, key: &str) -> Vec<u8> {
        let mut k = self.namespace.clone();
        k.extend_from_slice(b"kv/");
        k.extend_from_slice(key.as_bytes());
        k
    }

    fn queue_prefix(&self, key: &str) -> Vec<u8> {
        let mut k = self.namespace.clone();
        k.extend_from_slice(b"q/");
        k.extend_from_slice(key.as_bytes());
        k.push(b'/');
        k
    }

    fn network(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Network {
            addr: self.addr.clone(),
            reason: reason.into(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<BufReader<TcpStream>>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// POSTs `body` to `path` and returns the JSON reply.
    fn post(&self, op: &'static str, path: &str, body: &Value) -> Result<Value, StoreError> {
        let body = body.to_string();
        let request = std::format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let mut guard = self.lock();
        // A kept-alive connection the server has since closed fails before any reply
        // byte: then (and only then) the request is sent again on a new connection.
        for attempt in 0..2 {
            let reused = guard.is_some();
            if guard.is_none() {
                let stream = self.open()?;
                *guard = Some(BufReader::new(stream));
            }
            let Some(conn) = guard.as_mut() else {
                return Err(self.network("not connected"));
            };
            let sent = conn.get_mut().write_all(request.as_bytes());
            let reply = sent
                .map_err(|e| (false, e.to_string()))
                .and_then(|()| read_reply(conn));
            match reply {
                Ok((status, body)) => {
                    let json: Value = serde_json::from_slice(&body).map_err(|e| {
                        *guard = None;
                        StoreError::Backend {
                            op,
                            reason: std::format!("a reply that is not JSON ({e})"),
                        }
                    })?;
                    if status != 200 {
                        let msg = json
                            .get("message")
                            .or_else(|| json.get("error"))
                            .and_then(Value::as_str)
                            .unwrap_or("(no message)");
                        return Err(StoreError::Backend {
                            op,
                            reason: std::format!("etcd answered HTTP {status}: {msg}"),
                        });
                    }
                    return Ok(json);
                }
                Err((got_bytes, why)) => {
                    *guard = None;
                    if reused && !got_bytes && attempt == 0 {
                        continue;
                    }
                    return Err(self.network(why));
                }
            }
        }
        Err(self.network("the connection broke twice"))
    }

    fn open(&self) -> Result<TcpStream, StoreError> {
        use std::net::ToSocketAddrs;
        let mut last = String::from("no address");
        for a in self
            .addr
            .to_socket_addrs()
            .map_err(|e| self.network(e.to_string()))?
        {
            match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    // A reply that never comes must not hang us: etcd answers at once
                    // (no request here blocks on the server).
                    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                    return Ok(s);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(self.network(last))
    }

    fn range(
        &self,
        op: &'static str,
        key: &[u8],
        end: Option<&[u8]>,
    ) -> Result<Vec<Kv>, StoreError> {
        let mut req = json!({ "key": b64(key) });
        if let Some(end) = end {
            req["range_end"] = json!(b64(end));
            req["sort_order"] = json!("ASCEND");
            req["sort_target"] = json!("CREATE");
        }
        let reply = self.post(op, "/v3/kv/range", &req)?;
        Ok(kvs(&reply))
    }

    fn get_value(&self, op: &'static str, key: &str) -> Result<Option<Kv>, StoreError> {
        Ok(self
            .range(op, &self.value_key(key), None)?
            .into_iter()
            .next())
    }

    fn count(&self, op: &'static str, start: &[u8], end: &[u8]) -> Result<i64, StoreError> {
        let reply = self.post(
            op,
            "/v3/kv/range",
            &json!({ "key": b64(start), "range_end": b64(end), "count_only": true }),
        )?;
        Ok(int(reply.get("count").unwrap_or(&Value::Null)))
    }

    /// Writes `new` at `key` if the key is unchanged since `seen` (its mod revision, or
    /// `None` for "missing"); whether it was.
    fn put_if(
        &self,
        op: &'static str,
        key: &[u8],
        seen: Option<i64>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let compare = match seen {
            Some(rev) => json!({
                "key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()
            }),
            None => json!({
                "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"
            }),
        };
        let reply = self.post(
            op,
            "/v3/kv/txn",
            &json!({
                "compare": [compare],
                "success": [{ "request_put": { "key": b64(key), "value": b64(new) } }],
            }),
        )?;
        Ok(reply.get("succeeded").and_then(Value::as_bool) == Some(true))
    }

    /// Read-modify-write of the value under `key`, retried on contention: `f` gets the
    /// current value (if any) and returns the new one and the result.
    fn modify<T>(
        &self,
        op: &'static str,
        key: &str,
        mut f: impl FnMut(Option<&[u8]>) -> Result<(Option<Vec<u8>>, T), StoreError>,
    ) -> Result<T, StoreError> {
        let k = self.value_key(key);
        loop {
            let cur = self.get_value(op, key)?;
            let (new, out) = f(cur.as_ref().map(|kv| kv.value.as_slice()))?;
            let Some(new) = new else { return Ok(out) };
            if self.put_if(op, &k, cur.map(|kv| kv.mod_revision), &new)? {
                return Ok(out);
            }
        }
    }

    /// Polls until `ready`, up to `timeout` (zero: forever).
    fn poll_until(
        &self,
        op: &'static str,
        keys: &[&str],
        timeout: Duration,
        mut ready: impl FnMut() -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let start = Instant::now();
        let end = deadline(timeout);
        loop {
            if ready()? {
                return Ok(());
            }
            if end.is_some_and(|e| Instant::now() >= e) {
                return Err(StoreError::timeout(op, keys, start.elapsed()));
            }
            std::thread::sleep(POLL);
        }
    }

    fn all_exist(&self, op: &'static str, keys: &[&str]) -> Result<bool, StoreError> {
        for k in keys {
            if self.get_value(op, k)?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The key-values of a range reply (or of a txn's range response).
fn kvs(reply: &Value) -> Vec<Kv> {
    let decode = |v: Option<&Value>| -> Vec<u8> {
        v.and_then(Value::as_str)
            .and_then(|s| B64.decode(s).ok())
            .unwrap_or_default()
    };
    reply
        .get("kvs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|kv| Kv {
                    key: decode(kv.get("key")),
                    value: decode(kv.get("value")),
                    mod_revision: int(kv.get("mod_revision").unwrap_or(&Value::Null)),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads one HTTP/1.1 reply: (status, body). The error says whether any reply byte
/// had arrived.
fn read_reply(conn: &mut BufReader<TcpStream>) -> Result<(u16, Vec<u8>), (bool, String)> {
    let mut line = String::new();
    let mut header_bytes = 0;
    match conn.read_line(&mut line) {
        Ok(0) => return Err((false, "etcd closed the connection".into())),
        Ok(n) => header_bytes += n,
        Err(e) => return Err((false, e.to_string())),
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| (true, std::format!("not an HTTP reply: {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        let n = conn
            .read_line(&mut line)
            .map_err(|e| (true, e.to_string()))?;
        header_bytes += n;
        if n == 0 || header_bytes > MAX_HEADERS {
            return Err((true, "bad HTTP headers".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                length = value.parse().ok();
            } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let too_big = |n: usize| {
        (
            true,
            std::format!("a reply of {n} bytes is over {MAX_REPLY}"),
        )
    };
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line)
                .map_err(|e| (true, e.to_string()))?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| (true, "bad chunk size".to_string()))?;
            if size == 0 {
                line.clear();
                let _ = conn.read_line(&mut line);
                break;
            }
            if body.len().saturating_add(size) > MAX_REPLY {
                return Err(too_big(body.len().saturating_add(size)));
            }
            let at = body.len();
            body.resize(at + size, 0);
            conn.read_exact(&mut body[at..])
                .map_err(|e| (true, e.to_string()))?;
            line.clear();
            conn.read_line(&mut line)
                .map_err(|e| (true, e.to_string()))?;
        }
    } else {
        let n = length.ok_or_else(|| (true, "a reply without a length".to_string()))?;
        if n > MAX_REPLY {
            return Err(too_big(n));
        }
        body.resize(n, 0);
        conn.read_exact(&mut body)
            .map_err(|e| (true, e.to_string()))?;
    }
    Ok((status, body))
}

impl Store for EtcdStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.post(
            "set",
            "/v3/kv/put",
            &json!({ "key": b64(&self.value_key(key)), "value": b64(value) }),
        )
        .map(drop)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let mut found = None;
        self.poll_until("get", &[key], self.timeout(), || {
            found = self.get_value("get", key)?;
            Ok(found.is_some())
        })?;
        Ok(found.map(|kv| kv.value).unwrap_or_default())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.modify("add", key, |cur| {
            let (sum, bytes) = add_counter(key, cur, delta)?;
            Ok((Some(bytes), sum))
        })
    }

    fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.modify("compare_set", key, |cur| {
            Ok(match cur {
                None if expected.is_empty() => (Some(desired.to_vec()), desired.to_vec()),
                None => (None, expected.to_vec()),
                Some(v) if v == expected => (Some(desired.to_vec()), desired.to_vec()),
                Some(v) => (None, v.to_vec()),
            })
        })
    }

    fn delete_key(&self, key: &str) -> Result<bool, StoreError> {
        let reply = self.post(
            "delete_key",
            "/v3/kv/deleterange",
            &json!({ "key": b64(&self.value_key(key)) }),
        )?;
        Ok(int(reply.get("deleted").unwrap_or(&Value::Null)) == 1)
    }

    fn check(&self, keys: &[&str]) -> Result<bool, StoreError> {
        for k in keys {
            let queued = {
                let p = self.queue_prefix(k);
                self.count("check", &p, &prefix_end(&p))? > 0
            };
            if !queued && self.get_value("check", k)?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<(), StoreError> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        self.poll_until("wait", keys, timeout, || self.all_exist("wait", keys))
    }

    fn num_keys(&self) -> Result<i64, StoreError> {
        let mut start = self.namespace.clone();
        start.extend_from_slice(b"kv/");
        self.count("num_keys", &start, &prefix_end(&start))
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.modify("append", key, |cur| {
            let mut v = cur.map(<[u8]>::to_vec).unwrap_or_default();
            v.extend_from_slice(value);
            Ok((Some(v), ()))
        })
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.wait_multi(keys)?;
        let ops: Vec<Value> = keys
            .iter()
            .map(|k| json!({ "request_range": { "key": b64(&self.value_key(k)) } }))
            .collect();
        // One transaction: the values are read at one revision.
        let reply = self.post("multi_get", "/v3/kv/txn", &json!({ "success": ops }))?;
        let responses = reply
            .get("responses")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if responses.len() != keys.len() {
            return Err(StoreError::Backend {
                op: "multi_get",
                reason: std::format!("{} replies for {} keys", responses.len(), keys.len()),
            });
        }
        Ok(responses
            .iter()
            .map(|r| {
                r.get("response_range")
                    .map(kvs)
                    .and_then(|mut v| v.pop())
                    .map(|kv| kv.value)
                    .unwrap_or_default()
            })
            .collect())
    }

    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let ops: Vec<Value> = pairs
            .iter()
            .map(|(k, v)| {
                json!({ "request_put": { "key": b64(&self.value_key(k)), "value": b64(v) } })
            })
            .collect();
        self.post("multi_set", "/v3/kv/txn", &json!({ "success": ops }))
            .map(drop)
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut k = self.queue_prefix(key);
        // Unique across processes (random + pid) and within one (a counter).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = std::format!(
            "{:014x}-{:08x}-{:016x}",
            (crate::store::random_unit() * 2f64.powi(53)) as u64,
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        k.extend_from_slice(id.as_bytes());
        // Only creates: two pushes never share an id.
        if self.put_if("queue_push", &k, None, value)? {
            Ok(())
        } else {
            Err(StoreError::Backend {
                op: "queue_push",
                reason: "queue item id collision".into(),
            })
        }
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>, StoreError> {
        let p = self.queue_prefix(key);
        let end = prefix_end(&p);
        let start = Instant::now();
        let timeout = self.timeout();
        let until = deadline(timeout);
        loop {
            // The oldest item (by creation revision); delete it if it is still there.
            if let Some(kv) = self.range("queue_pop", &p, Some(&end))?.into_iter().next() {
                let reply = self.post(
                    "queue_pop",
                    "/v3/kv/txn",
                    &json!({
                        "compare": [{ "key": b64(&kv.key), "target": "MOD", "result": "EQUAL",
                                      "mod_revision": kv.mod_revision.to_string() }],
                        "success": [{ "request_delete_range": { "key": b64(&kv.key) } }],
                    }),
                )?;
                if reply.get("succeeded").and_then(Value::as_bool) == Some(true) {
                    return Ok(kv.value);
                }
                continue; // another client popped it
            }
            if !block {
                return Err(StoreError::QueueEmpty { key: key.into() });
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Err(StoreError::timeout("queue_pop", &[key], start.elapsed()));
            }
            std::thread::sleep(POLL);
        }
    }

    fn queue_len(&self, key: &str) -> Result<i64, StoreError> {
        let p = self.queue_prefix(key);
        self.count("queue_len", &p, &prefix_end(&p))
    }

    fn timeout(&self) -> Duration {
        self.timeout.get()
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout.set(timeout);
    }
}

impl EtcdStore {
    fn wait_multi(&self, keys: &[&str]) -> Result<(), StoreError> {
        self.poll_until("multi_get", keys, self.timeout(), || {
            self.all_exist("multi_get", keys)
        })
    }
}
