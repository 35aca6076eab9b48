//! [`TcpStore`]: a client of PyTorch's TCPStore protocol, and [`TcpStoreServer`].
//!
//! What goes on the wire is exactly what PyTorch's client sends (see [`crate::proto`]):
//! VALIDATE and PING on connect; every user key with a leading `/` (`set("foo")` writes
//! `/foo`) except the worker count `init/`; a blocking `get` as WAIT then GET, and a
//! wait that times out as CANCEL_WAIT, reading past a STOP_WAITING that crossed it. So
//! a `TcpStore` talks to a PyTorch server and a PyTorch client talks to a
//! [`TcpStoreServer`].
//!
//! Writes (SET, APPEND, MULTI_SET, QUEUE_PUSH) have no reply in the protocol, so
//! upstream's `set` returns before the server has applied it, and another client may
//! not see the value yet. Here each write is followed, in the same segment, by a PING
//! whose echo confirms it: when `set` returns, the value is there for everyone.
//!
//! One connection per `TcpStore`, one request at a time on it (the protocol has no
//! request ids); threads sharing a `TcpStore` take turns. A connection that breaks is
//! dropped, the operation fails with [`StoreError::Network`], and the next operation
//! connects again (retrying with back-off until the timeout).

mod server;

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::string::{String, ToString};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use std::vec::Vec;

pub use server::{ServerConfig, ServerStats, TcpStoreServer};

use crate::proto::{self, Command, Limits, Response, VALIDATE_MAGIC};
use crate::store::{TimeoutCell, deadline, time_left};
use crate::{DEFAULT_TIMEOUT, Store, StoreError};

/// What a connection the server closed reports.
const CLOSED_BY_SERVER: &str = "the server closed the connection";

/// The nonce of the PING that confirms a write.
const CONFIRM_NONCE: u32 = 0x7470_7374;

/// The worker-count key, sent without the `/` every other key gets (as upstream).
const INIT_KEY: &str = "init/";

/// How to reach (and whether to run) a TCPStore.
#[derive(Clone, Debug)]
pub struct TcpStoreOptions {
    /// The server's host (for a server: the address to bind; `""` or `"::"` binds
    /// every address).
    pub host: String,
    /// The server's port (default 29500; a server may pass 0 to pick one, see
    /// [`TcpStore::port`]).
    pub port: u16,
    /// Start a server in this process, then connect to it.
    pub is_server: bool,
    /// How many workers will connect; with `wait_workers`, each adds itself to
    /// `init/` and the server's own client waits until all have.
    pub num_workers: Option<usize>,
    /// See `num_workers`.
    pub wait_workers: bool,
    /// The store's timeout: blocking operations and connecting (zero: forever).
    pub timeout: Duration,
    /// Limits on what either side may send.
    pub limits: Limits,
    /// The server's own settings (when `is_server`).
    pub server: ServerConfig,
}

impl Default for TcpStoreOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 29500,
            is_server: false,
            num_workers: None,
            wait_workers: true,
            timeout: DEFAULT_TIMEOUT,
            limits: Limits::DEFAULT,
            server: ServerConfig::default(),
        }
    }
}

/// A reply, owned.
enum Reply {
    Value(Vec<u8>),
    Int(i64),
    Flag(bool),
    Values(Vec<Vec<u8>>),
    Pong(u32),
    Pop(Option<Vec<u8>>),
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A failure on the connection: a timeout waiting for bytes, or the connection is
/// unusable.
enum ConnError {
    TimedOut,
    Broken(String),
    Proto(String),
}

impl Conn {
    fn send(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.stream
            .write_all(bytes)
            .map_err(|e| ConnError::Broken(e.to_string()))
    }

    /// Reads the reply to `cmd` (with `keys` values for MULTI_GET), until `until`.
    fn reply(
        &mut self,
        cmd: Command,
        keys: usize,
        limits: &Limits,
        until: Option<Instant>,
    ) -> Result<Reply, ConnError> {
        let mut chunk = [0u8; 16 << 10];
        loop {
            let parsed = proto::parse_response(cmd, keys, &self.buf, limits)
                .map_err(|e| ConnError::Proto(e.to_string()))?;
            if let Some((resp, n)) = parsed {
                let reply = match resp {
                    Response::Value(v) => Reply::Value(v.to_vec()),
                    Response::Int(n) => Reply::Int(n),
                    Response::Check { ready } => Reply::Flag(ready),
                    Response::Wait { stop_waiting } => Reply::Flag(stop_waiting),
                    Response::Values(vs) => Reply::Values(vs.iter().map(<[u8]>::to_vec).collect()),
                    Response::Pong(n) => Reply::Pong(n),
                    Response::QueuePop { value, .. } => Reply::Pop(value.map(<[u8]>::to_vec)),
                    _ => {
                        return Err(ConnError::Proto(std::format!(
                            "unexpected reply to {cmd:?}"
                        )));
                    }
                };
                self.buf.drain(..n);
                return Ok(reply);
            }
            let timeout = match until {
                None => None,
                Some(t) => {
                    let left = t.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ConnError::TimedOut);
                    }
                    Some(left)
                }
            };
            self.stream
                .set_read_timeout(timeout)
                .map_err(|e| ConnError::Broken(e.to_string()))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ConnError::Broken(CLOSED_BY_SERVER.into())),
                Ok(n) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ConnError::TimedOut);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Broken(e.to_string())),
            }
        }
    }
}

/// A TCPStore client (see the module docs), optionally owning the server it talks to.
pub struct TcpStore {
    addr: String,
    port: u16,
    limits: Limits,
    timeout: TimeoutCell,
    conn: Mutex<Option<Conn>>,
    server: Option<TcpStoreServer>,
}

impl std::fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStore")
            .field("addr", &self.addr)
            .field("server", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

fn wire_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(b'/');
    k.extend_from_slice(key.as_bytes());
    k
}

/// Appends `cmd` and a key list of `keys` as they go on the wire (each with its `/`).
fn put_key_list(b: &mut Vec<u8>, cmd: Command, keys: &[&str]) {
    b.push(cmd as u8);
    b.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        b.extend_from_slice(&(k.len() as u64 + 1).to_le_bytes());
        b.push(b'/');
        b.extend_from_slice(k.as_bytes());
    }
}

impl TcpStore {
    /// Connects (starting the server first when `options.is_server`), retrying with
    /// back-off until the timeout; then, with `num_workers` and `wait_workers`, counts
    /// itself in `init/`, and the server's client waits for every worker.
    ///
    /// # Errors
    /// [`StoreError::Network`]: no server answered VALIDATE and PING in time, or the
    /// server could not bind; [`StoreError::Timeout`]: the workers did not all join.
    pub fn new(options: TcpStoreOptions) -> Result<Self, StoreError> {
        let server = if options.is_server {
            Some(
                TcpStoreServer::bind(&options.host, options.port, options.server).map_err(|e| {
                    StoreError::Network {
                        addr: std::format!("{}:{}", options.host, options.port),
                        reason: std::format!("cannot serve: {e}"),
                    }
                })?,
            )
        } else {
            None
        };
        let port = server.as_ref().map_or(options.port, TcpStoreServer::port);
        let host = if options.is_server && (options.host.is_empty() || options.host == "::") {
            "127.0.0.1".to_string()
        } else {
            options.host.clone()
        };
        let store = Self {
            addr: std::format!("{host}:{port}"),
            port,
            limits: options.limits,
            timeout: TimeoutCell::new(options.timeout),
            conn: Mutex::new(None),
            server,
        };
        // Connect now, so a missing server shows here rather than at the first use.
        store.with_conn("connect", &[], |_| Ok(()))?;
        if let (Some(n), true) = (options.num_workers, options.wait_workers) {
            store.add_wire(INIT_KEY.as_bytes(), 1)?;
            if options.is_server {
                store.wait_for_workers(n)?;
            }
        }
        Ok(store)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The server this store runs, if it does.
    pub fn server(&self) -> Option<&TcpStoreServer> {
        self.server.as_ref()
    }

    fn wait_for_workers(&self, n: usize) -> Result<(), StoreError> {
        let start = Instant::now();
        let end = deadline(self.timeout());
        loop {
            let joined = match self.call(
                "wait_for_workers",
                &[INIT_KEY],
                Command::Get,
                0,
                None,
                |b| {
                    b.push(Command::Get as u8);
                    proto::put_string(b, INIT_KEY.as_bytes());
                },
            )? {
                Reply::Value(v) => crate::data::parse_counter(&v).unwrap_or(0),
                _ => 0,
            };
            if usize::try_from(joined).is_ok_and(|j| j >= n) {
                return Ok(());
            }
            if end.is_some_and(|e| Instant::now() >= e) {
                return Err(StoreError::Timeout {
                    op: "wait_for_workers",
                    keys: std::vec![std::format!("{INIT_KEY} ({joined}/{n} workers joined)")],
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn network(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Network {
            addr: self.addr.clone(),
            reason: reason.into(),
        }
    }

    /// Connects: retries connect + VALIDATE + PING with back-off until the timeout.
    fn connect(&self) -> Result<Conn, StoreError> {
        let start = Instant::now();
        let end = deadline(self.timeout());
        let mut delay = Duration::from_millis(100);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let err = match self.try_connect(end) {
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            let left = end.map(|e| e.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(self.network(std::format!(
                    "no server after {tries} tries in {:.1} s: {err}",
                    start.elapsed().as_secs_f64()
                )));
            }
            // Exponential back-off with jitter (±50%), as upstream's, capped at 60 s.
            let jitter = 0.5 + (crate::store::random_unit());
            let sleep = delay.mul_f64(jitter);
            let sleep = left.map_or(sleep, |l| sleep.min(l));
            tracing::debug!(addr = %self.addr, tries, "tcp store: connect failed ({err}); retrying in {sleep:?}");
            std::thread::sleep(sleep);
            delay = delay.mul_f64(1.5).min(Duration::from_secs(60));
        }
    }

    fn try_connect(&self, end: Option<Instant>) -> Result<Conn, String> {
        let addrs: Vec<_> = self
            .addr
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .collect();
        let mut last = String::from("no address");
        for a in addrs {
            let timeout = end
                .map(|e| e.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(60))
                .max(Duration::from_millis(1));
            let stream = match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => s,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let mut conn = Conn {
                stream,
                buf: Vec::new(),
            };
            let mut hello = std::vec![Command::Validate as u8];
            hello.extend_from_slice(&VALIDATE_MAGIC.to_le_bytes());
            let nonce = std::process::id();
            hello.push(Command::Ping as u8);
            hello.extend_from_slice(&nonce.to_le_bytes());
            let ping_until = Some(Instant::now() + timeout.min(Duration::from_secs(30)));
            let checked = conn
                .send(&hello)
                .and_then(|()| conn.reply(Command::Ping, 0, &self.limits, ping_until));
            match checked {
                Ok(Reply::Pong(n)) if n == nonce => return Ok(conn),
                Ok(Reply::Pong(n)) => {
                    last = std::format!("ping failed: expected {nonce}, got {n}");
                }
                Ok(_) => last = "ping failed".into(),
                Err(ConnError::TimedOut) => last = "no reply to VALIDATE/PING".into(),
                Err(ConnError::Broken(e) | ConnError::Proto(e)) => last = e,
            }
        }
        Err(last)
    }

    /// Runs `f` on the connection (connecting first if needed); a broken connection is
    /// dropped so the next call connects again.
    fn with_conn<T>(
        &self,
        op: &'static str,
        keys: &[&str],
        f: impl FnOnce(&mut Conn) -> Result<T, ConnError>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let mut guard = self.lock();
        if guard.is_none() {
            *guard = Some(self.connect()?);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(self.network("not connected"));
        };
        match f(conn) {
            Ok(v) => Ok(v),
            Err(ConnError::TimedOut) => {
                // The reply may still come: the connection is out of step. Drop it.
                *guard = None;
                Err(StoreError::timeout(op, keys, start.elapsed()))
            }
            Err(ConnError::Broken(why)) => {
                *guard = None;
                Err(self.network(why))
            }
            Err(ConnError::Proto(why)) => {
                *guard = None;
                Err(StoreError::Protocol {
                    addr: self.addr.clone(),
                    reason: why,
                })
            }
        }
    }

    /// Sends one request (written by `encode`) and reads its reply, if it has one.
    fn call(
        &self,
        op: &'static str,
        keys: &[&str],
        cmd: Command,
        nkeys: usize,
        until: Option<Instant>,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Reply, StoreError> {
        let mut req = Vec::new();
        encode(&mut req);
        let limits = self.limits;
        // No reply waits longer than the store's timeout (zero: forever).
        let until = until.or_else(|| deadline(self.timeout()));
        let confirm = !proto::has_response(cmd);
        if confirm {
            // A write has no reply; a PING after it (same segment) confirms the server
            // has applied it, so once `set` returns every client sees the value.
            req.push(Command::Ping as u8);
            req.extend_from_slice(&CONFIRM_NONCE.to_le_bytes());
        }
        self.with_conn(op, keys, |c| {
            c.send(&req)?;
            if confirm {
                match c.reply(Command::Ping, 0, &limits, until)? {
                    Reply::Pong(CONFIRM_NONCE) => Ok(Reply::Flag(true)),
                    _ => Err(ConnError::Proto(
                        "a write's confirming PING came back wrong".into(),
                    )),
                }
            } else {
                c.reply(cmd, nkeys, &limits, until)
            }
        })
    }

    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        let len = key.len() as u64 + 1;
        if len > self.limits.max_key {
            return Err(StoreError::TooLarge {
                key: key.chars().take(64).collect(),
                what: "key length",
                len,
                limit: self.limits.max_key,
            });
        }
        Ok(())
    }

    fn check_value(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_key(key)?;
        if value.len() as u64 > self.limits.max_value {
            return Err(StoreError::TooLarge {
                key: key.into(),
                what: "value length",
                len: value.len() as u64,
                limit: self.limits.max_value,
            });
        }
        Ok(())
    }

    fn check_keys(&self, keys: &[&str]) -> Result<(), StoreError> {
        if keys.len() as u64 > self.limits.max_keys {
            return Err(StoreError::TooLarge {
                key: keys.first().copied().unwrap_or_default().into(),
                what: "key count",
                len: keys.len() as u64,
                limit: self.limits.max_keys,
            });
        }
        keys.iter().try_for_each(|k| self.check_key(k))
    }

    fn add_wire(&self, key: &[u8], delta: i64) -> Result<i64, StoreError> {
        let shown = String::from_utf8_lossy(key).into_owned();
        match self.call("add", &[&shown], Command::Add, 0, None, |b| {
            b.push(Command::Add as u8);
            proto::put_string(b, key);
            b.extend_from_slice(&delta.to_le_bytes());
        })? {
            Reply::Int(n) => Ok(n),
            _ => Err(self.network("bad reply to ADD")),
        }
    }

    /// WAIT for `keys` until the timeout; on timeout, CANCEL_WAIT and the race dance.
    fn wait_keys(
        &self,
        op: &'static str,
        keys: &[&str],
        timeout: Duration,
    ) -> Result<(), StoreError> {
        self.check_keys(keys)?;
        let mut req = Vec::new();
        put_key_list(&mut req, Command::Wait, keys);
        let start = Instant::now();
        let until = deadline(timeout);
        let limits = self.limits;
        let done = self.with_conn(op, keys, |c| {
            c.send(&req)?;
            match c.reply(Command::Wait, 0, &limits, until) {
                Ok(Reply::Flag(true)) => Ok(true),
                Ok(_) => Err(ConnError::Proto("WAIT answered WAIT_CANCELED".into())),
                Err(ConnError::TimedOut) => {
                    // Cancel; a STOP_WAITING may already be on its way, then the
                    // WAIT_CANCELED follows it.
                    c.send(&[Command::CancelWait as u8])?;
                    let grace = Some(Instant::now() + Duration::from_secs(30));
                    match c.reply(Command::CancelWait, 0, &limits, grace)? {
                        Reply::Flag(false) => Ok(false),
                        _ => match c.reply(Command::CancelWait, 0, &limits, grace)? {
                            Reply::Flag(false) => Ok(false),
                            _ => Err(ConnError::Proto(
                                "no WAIT_CANCELED after CANCEL_WAIT".into(),
                            )),
                        },
                    }
                }
                Err(e) => Err(e),
            }
        })?;
        if done {
            Ok(())
        } else {
            Err(StoreError::timeout(op, keys, start.elapsed()))
        }
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_value(key, value)?;
        self.call("set", &[key], Command::Set, 0, None, |b| {
            b.push(Command::Set as u8);
            proto::put_string(b, &wire_key(key));
            proto::put_string(b, value);
        })
        .map(drop)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.wait_keys("get", &[key], self.timeout())?;
        match self.call("get", &[key], Command::Get, 0, None, |b| {
            b.push(Command::Get as u8);
            proto::put_string(b, &wire_key(key));
        })? {
            Reply::Value(v) => Ok(v),
            _ => Err(self.network("bad reply to GET")),
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.check_key(key)?;
        self.add_wire(&wire_key(key), delta).map_err(|e| match e {
            // A server closes the connection of an ADD on a value that is not a number
            // (or that would overflow); that is what closing right then means.
            StoreError::Network { reason, .. } if reason == CLOSED_BY_SERVER => {
                StoreError::NotANumber {
                    key: key.into(),
                    value: "(unknown: the server refused to add to it)".into(),
                }
            }
            e => e,
        })
    }

    fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.check_value(key, expected)?;
        self.check_value(key, desired)?;
        match self.call("compare_set", &[key], Command::CompareSet, 0, None, |b| {
            b.push(Command::CompareSet as u8);
            proto::put_string(b, &wire_key(key));
            proto::put_string(b, expected);
            proto::put_string(b, desired);
        })? {
            Reply::Value(v) => Ok(v),
            _ => Err(self.network("bad reply to COMPARE_SET")),
        }
    }

    fn delete_key(&self, key: &str) -> Result<bool, StoreError> {
        self.check_key(key)?;
        match self.call("delete_key", &[key], Command::DeleteKey, 0, None, |b| {
            b.push(Command::DeleteKey as u8);
            proto::put_string(b, &wire_key(key));
        })? {
            Reply::Int(n) => Ok(n == 1),
            _ => Err(self.network("bad reply to DELETE_KEY")),
        }
    }

    fn check(&self, keys: &[&str]) -> Result<bool, StoreError> {
        self.check_keys(keys)?;
        match self.call("check", keys, Command::Check, 0, None, |b| {
            put_key_list(b, Command::Check, keys);
        })? {
            Reply::Flag(ready) => Ok(ready),
            _ => Err(self.network("bad reply to CHECK")),
        }
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<(), StoreError> {
        self.wait_keys("wait", keys, timeout.unwrap_or_else(|| self.timeout()))
    }

    fn num_keys(&self) -> Result<i64, StoreError> {
        match self.call("num_keys", &[], Command::GetNumKeys, 0, None, |b| {
            b.push(Command::GetNumKeys as u8);
        })? {
            Reply::Int(n) => Ok(n),
            _ => Err(self.network("bad reply to GETNUMKEYS")),
        }
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_value(key, value)?;
        self.call("append", &[key], Command::Append, 0, None, |b| {
            b.push(Command::Append as u8);
            proto::put_string(b, &wire_key(key));
            proto::put_string(b, value);
        })
        .map(drop)
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.wait_keys("multi_get", keys, self.timeout())?;
        match self.call(
            "multi_get",
            keys,
            Command::MultiGet,
            keys.len(),
            None,
            |b| {
                put_key_list(b, Command::MultiGet, keys);
            },
        )? {
            Reply::Values(v) => Ok(v),
            _ => Err(self.network("bad reply to MULTI_GET")),
        }
    }

    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
        self.check_keys(&keys)?;
        for (k, v) in pairs {
            self.check_value(k, v)?;
        }
        self.call("multi_set", &keys, Command::MultiSet, 0, None, |b| {
            b.push(Command::MultiSet as u8);
            b.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
            for (k, v) in pairs {
                proto::put_string(b, &wire_key(k));
                proto::put_string(b, v);
            }
        })
        .map(drop)
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_value(key, value)?;
        self.call("queue_push", &[key], Command::QueuePush, 0, None, |b| {
            b.push(Command::QueuePush as u8);
            proto::put_string(b, &wire_key(key));
            proto::put_string(b, value);
        })
        .map(drop)
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>, StoreError> {
        self.check_key(key)?;
        let start = Instant::now();
        let timeout = self.timeout();
        loop {
            if block {
                let left = time_left(timeout, start)
                    .ok_or_else(|| StoreError::timeout("queue_pop", &[key], start.elapsed()))?;
                self.wait_keys("queue_pop", &[key], left)?;
            }
            match self.call("queue_pop", &[key], Command::QueuePop, 0, None, |b| {
                b.push(Command::QueuePop as u8);
                proto::put_string(b, &wire_key(key));
            })? {
                Reply::Pop(Some(v)) => return Ok(v),
                // Another client took it between our WAIT and POP: wait again.
                Reply::Pop(None) if block => {}
                _ => return Err(StoreError::QueueEmpty { key: key.into() }),
            }
        }
    }

    fn queue_len(&self, key: &str) -> Result<i64, StoreError> {
        self.check_key(key)?;
        match self.call("queue_len", &[key], Command::QueueLen, 0, None, |b| {
            b.push(Command::QueueLen as u8);
            proto::put_string(b, &wire_key(key));
        })? {
            Reply::Int(n) => Ok(n),
            _ => Err(self.network("bad reply to QUEUE_LEN")),
        }
    }

    fn timeout(&self) -> Duration {
        self.timeout.get()
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout.set(timeout);
    }
}
