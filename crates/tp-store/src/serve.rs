//! A TCPStore server as a sans-IO state machine: it owns the [`Data`], the per-client
//! protocol state and the wait bookkeeping; a driver feeds it the bytes each client
//! sent and writes out the bytes it produces, to whichever client they are for (a SET
//! from one client can finish another's WAIT).
//!
//! ```
//! use tp_store::proto::{Limits, Request, VALIDATE_MAGIC};
//! use tp_store::serve::{ClientId, Server};
//!
//! let mut server = Server::new(Limits::DEFAULT);
//! let (a, b) = (ClientId(1), ClientId(2));
//! server.connect(a);
//! server.connect(b);
//! let mut bytes = Vec::new();
//! Request::Validate { magic: VALIDATE_MAGIC }.encode(&mut bytes);
//! assert_eq!(server.receive(a, &bytes), Ok(5));
//! assert_eq!(server.receive(b, &bytes), Ok(5));
//! // a waits for "/k" (WAIT: a count, then the keys) ...
//! let mut wait = vec![6];
//! tp_store::proto::put_strings(&mut wait, [&b"/k"[..]]);
//! server.receive(a, &wait).unwrap();
//! assert_eq!(server.poll_output(), None);
//! // ... until b sets it: a gets STOP_WAITING (0).
//! let mut set = Vec::new();
//! Request::Set { key: b"/k", value: b"v" }.encode(&mut set);
//! server.receive(b, &set).unwrap();
//! assert_eq!(server.poll_output(), Some((a, vec![0])));
//! ```
//!
//! Rules, beyond each command's semantics (see [`Data`]):
//! - A connection's first command must be VALIDATE with [`VALIDATE_MAGIC`]; anything
//!   else is refused (PyTorch's libuv server lets a later chunk through; this one does
//!   not).
//! - SET, ADD, APPEND, MULTI_SET and a COMPARE_SET that writes finish the waits on
//!   their keys; QUEUE_PUSH finishes at most one (the first waiter it completes), since
//!   one value can satisfy one pop.
//! - A WAIT while the same client already waits is refused (a conforming client has
//!   one request in flight). CANCEL_WAIT always replies WAIT_CANCELED, after the
//!   STOP_WAITING the client may already have been sent: that is the race upstream's
//!   client expects.
//! - A client that disconnects stops waiting; what it stored stays.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::fmt;

use crate::data::{Data, NotANumber};
use crate::proto::{self, Limits, ProtoError, Request, Response, VALIDATE_MAGIC};

/// Who a driver is talking to; the driver picks the numbers.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct ClientId(pub u64);

/// Why a client's bytes were refused: the driver closes that connection (and calls
/// [`Server::disconnect`]); every other client is unaffected.
#[non_exhaustive]
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum ServeError {
    /// Bytes that are not the protocol, or lengths over the limits.
    Proto(ProtoError),
    /// The first command was not VALIDATE with the right magic.
    NotValidated {
        /// The first byte the client sent.
        first: u8,
    },
    /// ADD on a value that is not a number.
    NotANumber(NotANumber),
    /// A WAIT or BARRIER while this client already waits.
    AlreadyWaiting,
    /// A client the server does not know (never connected, or disconnected).
    UnknownClient(ClientId),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Proto(e) => write!(f, "protocol error: {e}"),
            Self::NotValidated { first } => write!(
                f,
                "the first command must be VALIDATE with magic {VALIDATE_MAGIC:#x} (got byte {first})"
            ),
            Self::NotANumber(e) => e.fmt(f),
            Self::AlreadyWaiting => f.write_str("a second WAIT while the first is pending"),
            Self::UnknownClient(id) => write!(f, "unknown client {}", id.0),
        }
    }
}

impl core::error::Error for ServeError {}

impl From<ProtoError> for ServeError {
    fn from(e: ProtoError) -> Self {
        Self::Proto(e)
    }
}

#[derive(Debug, Default)]
struct Client {
    validated: bool,
    /// Keys still missing for this client's WAIT (each listed in `waiters`).
    waiting_on: Vec<Vec<u8>>,
    /// The counter key of the BARRIER this client waits at.
    barrier: Option<Vec<u8>>,
}

impl Client {
    fn waits(&self) -> bool {
        !self.waiting_on.is_empty() || self.barrier.is_some()
    }
}

/// The server: data, clients and their waits. See the module docs.
#[derive(Debug)]
pub struct Server {
    data: Data,
    limits: Limits,
    clients: BTreeMap<ClientId, Client>,
    /// Key → clients whose WAIT includes it, in arrival order.
    waiters: BTreeMap<Vec<u8>, Vec<ClientId>>,
    /// Barrier key → clients waiting there.
    barriers: BTreeMap<Vec<u8>, Vec<ClientId>>,
    /// Bytes to send, per client, in the order produced.
    out: BTreeMap<ClientId, Vec<u8>>,
    /// Clients with bytes in `out`, in the order they got them.
    ready: VecDeque<ClientId>,
}

const STOP_WAITING: u8 = 0;
const WAIT_CANCELED: u8 = 1;

impl Server {
    /// A server with no data and no clients, refusing requests over `limits`.
    pub const fn new(limits: Limits) -> Self {
        Self {
            data: Data::new(),
            limits,
            clients: BTreeMap::new(),
            waiters: BTreeMap::new(),
            barriers: BTreeMap::new(),
            out: BTreeMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// The data.
    pub const fn data(&self) -> &Data {
        &self.data
    }

    /// The limits requests are checked against.
    pub const fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many clients are connected.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// How many clients wait (WAIT or BARRIER).
    pub fn waiting(&self) -> usize {
        self.clients.values().filter(|c| c.waits()).count()
    }

    /// A new connection.
    pub fn connect(&mut self, id: ClientId) {
        self.clients.insert(id, Client::default());
    }

    /// A connection ended (closed by either side): its waits are dropped, and bytes
    /// not yet taken for it are discarded.
    pub fn disconnect(&mut self, id: ClientId) {
        if let Some(client) = self.clients.remove(&id) {
            self.forget_waits(id, &client);
        }
        self.out.remove(&id);
        self.ready.retain(|c| *c != id);
    }

    /// Whether `id` has completed VALIDATE.
    pub fn is_validated(&self, id: ClientId) -> bool {
        self.clients.get(&id).is_some_and(|c| c.validated)
    }

    /// Handles every complete request at the front of `input` (bytes from `id`) and
    /// returns how many bytes that was; the rest is an incomplete request to offer again
    /// with more bytes after it. Replies are taken with [`poll_output`](Self::poll_output).
    ///
    /// # Errors
    /// [`ServeError`]: the driver must close this client's connection. Requests before
    /// the bad one were handled.
    pub fn receive(&mut self, id: ClientId, input: &[u8]) -> Result<usize, ServeError> {
        let limits = self.limits;
        let mut used = 0;
        loop {
            let rest = input.get(used..).unwrap_or_default();
            let validated = self
                .clients
                .get(&id)
                .ok_or(ServeError::UnknownClient(id))?
                .validated;
            if !validated {
                // Strict: the very first byte must be VALIDATE's, before waiting for the
                // rest of it.
                if let Some(&first) = rest.first()
                    && first != 0
                {
                    return Err(ServeError::NotValidated { first });
                }
            }
            let Some((req, n)) = proto::parse_request(rest, &limits)? else {
                return Ok(used);
            };
            self.handle(id, req)?;
            used += n;
        }
    }

    /// The next bytes to send, and to whom. Bytes for one client come out in order.
    pub fn poll_output(&mut self) -> Option<(ClientId, Vec<u8>)> {
        let id = self.ready.pop_front()?;
        self.out.remove(&id).map(|bytes| (id, bytes))
    }

    fn reply(&mut self, id: ClientId, resp: &Response<'_>) {
        resp.encode(outbox(&mut self.out, &mut self.ready, id));
    }

    fn reply_byte(&mut self, id: ClientId, b: u8) {
        outbox(&mut self.out, &mut self.ready, id).push(b);
    }

    fn handle(&mut self, id: ClientId, req: Request<'_>) -> Result<(), ServeError> {
        match req {
            Request::Validate { magic } => {
                if magic != VALIDATE_MAGIC {
                    return Err(ServeError::NotValidated { first: 0 });
                }
                if let Some(c) = self.clients.get_mut(&id) {
                    c.validated = true;
                }
            }
            Request::Set { key, value } => {
                self.data.set(key, value);
                self.arrived(key, false);
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let (now, wrote) = self.data.compare_set(key, expected, desired);
                self.reply(id, &Response::Value(&now));
                if wrote {
                    self.arrived(key, false);
                }
            }
            Request::Get { key } => {
                // Missing: an empty value, as the libuv server (clients WAIT first).
                let v = self.data.get(key).unwrap_or_default().to_vec();
                self.reply(id, &Response::Value(&v));
            }
            Request::Add { key, delta } => {
                let n = self.data.add(key, delta).map_err(ServeError::NotANumber)?;
                self.reply(id, &Response::Int(n));
                self.arrived(key, false);
            }
            Request::Check { keys } => {
                let ready = keys.iter().all(|k| self.data.contains(k));
                self.reply(id, &Response::Check { ready });
            }
            Request::Wait { keys } => {
                if self.clients.get(&id).is_some_and(Client::waits) {
                    return Err(ServeError::AlreadyWaiting);
                }
                let mut missing: Vec<Vec<u8>> = Vec::new();
                for k in keys.iter() {
                    if !self.data.contains(k) && !missing.iter().any(|m| m == k) {
                        missing.push(k.to_vec());
                    }
                }
                if missing.is_empty() {
                    self.reply_byte(id, STOP_WAITING);
                } else {
                    for k in &missing {
                        self.waiters.entry(k.clone()).or_default().push(id);
                    }
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.waiting_on = missing;
                    }
                }
            }
            Request::GetNumKeys => {
                let n = i64::try_from(self.data.len()).unwrap_or(i64::MAX);
                self.reply(id, &Response::Int(n));
            }
            Request::DeleteKey { key } => {
                let n = i64::from(self.data.delete(key));
                self.reply(id, &Response::Int(n));
            }
            Request::Append { key, value } => {
                self.data.append(key, value);
                self.arrived(key, false);
            }
            Request::MultiGet { keys } => {
                let buf = outbox(&mut self.out, &mut self.ready, id);
                for k in keys.iter() {
                    proto::put_string(buf, self.data.get(k).unwrap_or_default());
                }
            }
            Request::MultiSet { pairs } => {
                for (k, v) in pairs.iter() {
                    self.data.set(k, v);
                    self.arrived(k, false);
                }
            }
            Request::CancelWait => {
                if let Some(c) = self.clients.get_mut(&id) {
                    let old = Client {
                        validated: c.validated,
                        waiting_on: core::mem::take(&mut c.waiting_on),
                        barrier: c.barrier.take(),
                    };
                    self.forget_waits(id, &old);
                }
                self.reply_byte(id, WAIT_CANCELED);
            }
            Request::Ping { nonce } => self.reply(id, &Response::Pong(nonce)),
            Request::QueuePush { key, value } => {
                self.data.queue_push(key, value);
                self.arrived(key, true);
            }
            Request::QueuePop { key } => {
                let (len_before, value) = self.data.queue_pop(key);
                self.reply(
                    id,
                    &Response::QueuePop {
                        len_before,
                        value: value.as_deref(),
                    },
                );
            }
            Request::QueueLen { key } => {
                let n = self.data.queue_len(key);
                self.reply(id, &Response::Int(n));
            }
            Request::ListKeys => {
                let buf = outbox(&mut self.out, &mut self.ready, id);
                let n = i64::try_from(self.data.len()).unwrap_or(i64::MAX);
                buf.extend_from_slice(&n.to_le_bytes());
                for k in self.data.keys() {
                    proto::put_string(buf, k);
                }
            }
            Request::Barrier { key, world_size } => {
                if self.clients.get(&id).is_some_and(Client::waits) {
                    return Err(ServeError::AlreadyWaiting);
                }
                let n = self.data.add(key, 1).map_err(ServeError::NotANumber)?;
                if n >= world_size {
                    self.reply_byte(id, STOP_WAITING);
                    for w in self.barriers.remove(key).unwrap_or_default() {
                        if let Some(c) = self.clients.get_mut(&w) {
                            c.barrier = None;
                        }
                        self.reply_byte(w, STOP_WAITING);
                    }
                } else {
                    self.barriers.entry(key.to_vec()).or_default().push(id);
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.barrier = Some(key.to_vec());
                    }
                }
                self.arrived(key, false);
            }
        }
        Ok(())
    }

    /// `key` now exists: every client waiting on it has one key fewer to wait for
    /// (`one`: stop after the first client this completes — a queue push).
    fn arrived(&mut self, key: &[u8], one: bool) {
        let Some(list) = self.waiters.get_mut(key) else {
            return;
        };
        let mut done = Vec::new();
        let mut taken = 0;
        for &w in list.iter() {
            taken += 1;
            let Some(c) = self.clients.get_mut(&w) else {
                continue;
            };
            c.waiting_on.retain(|k| k.as_slice() != key);
            if c.waiting_on.is_empty() {
                done.push(w);
                if one {
                    break;
                }
            }
        }
        list.drain(..taken);
        if list.is_empty() {
            self.waiters.remove(key);
        }
        for w in done {
            self.reply_byte(w, STOP_WAITING);
        }
    }

    fn forget_waits(&mut self, id: ClientId, client: &Client) {
        for k in &client.waiting_on {
            if let Some(list) = self.waiters.get_mut(k) {
                list.retain(|c| *c != id);
                if list.is_empty() {
                    self.waiters.remove(k);
                }
            }
        }
        if let Some(k) = &client.barrier
            && let Some(list) = self.barriers.get_mut(k)
        {
            list.retain(|c| *c != id);
            if list.is_empty() {
                self.barriers.remove(k);
            }
        }
    }
}

/// `id`'s buffer of bytes to send, which `ready` lists once it has any.
fn outbox<'a>(
    out: &'a mut BTreeMap<ClientId, Vec<u8>>,
    ready: &mut VecDeque<ClientId>,
    id: ClientId,
) -> &'a mut Vec<u8> {
    let buf = out.entry(id).or_default();
    if buf.is_empty() {
        ready.push_back(id);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    fn validate() -> Vec<u8> {
        let mut b = Vec::new();
        Request::Validate {
            magic: VALIDATE_MAGIC,
        }
        .encode(&mut b);
        b
    }

    fn wait(keys: &[&[u8]]) -> Vec<u8> {
        let mut b = vec![Command::Wait as u8];
        proto::put_strings(&mut b, keys.iter().copied());
        b
    }

    fn set(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        Request::Set { key, value }.encode(&mut b);
        b
    }

    use crate::proto::Command;

    fn server_with(n: u64) -> Server {
        let mut s = Server::new(Limits::DEFAULT);
        for i in 1..=n {
            s.connect(ClientId(i));
            assert_eq!(s.receive(ClientId(i), &validate()), Ok(5));
        }
        s
    }

    fn drain(s: &mut Server) -> Vec<(ClientId, Vec<u8>)> {
        core::iter::from_fn(|| s.poll_output()).collect()
    }

    #[test]
    fn the_first_command_must_be_validate_even_split() {
        let mut s = Server::new(Limits::DEFAULT);
        let c = ClientId(1);
        s.connect(c);
        // A port scan's first bytes.
        assert_eq!(
            s.receive(c, b"GET / HTTP/1.1\r\n"),
            Err(ServeError::NotValidated { first: b'G' })
        );
        // Split across reads: fine.
        let mut s = Server::new(Limits::DEFAULT);
        s.connect(c);
        let v = validate();
        assert_eq!(s.receive(c, &v[..2]), Ok(0));
        assert_eq!(s.receive(c, &v), Ok(5));
        assert!(s.is_validated(c));
        // Wrong magic.
        let mut s = Server::new(Limits::DEFAULT);
        s.connect(c);
        assert!(s.receive(c, &[0, 1, 2, 3, 4]).is_err());
        // A SET before VALIDATE.
        let mut s = Server::new(Limits::DEFAULT);
        s.connect(c);
        assert!(s.receive(c, &set(b"/k", b"v")).is_err());
        assert_eq!(s.data().len(), 0, "nothing applied");
    }

    #[test]
    fn wait_is_answered_when_the_last_key_arrives_from_another_client() {
        let mut s = server_with(2);
        let (a, b) = (ClientId(1), ClientId(2));
        s.receive(a, &wait(&[b"/x", b"/y", b"/x"])).unwrap();
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.waiting(), 1);
        s.receive(b, &set(b"/x", b"1")).unwrap();
        assert!(drain(&mut s).is_empty(), "still missing /y");
        let mut add = Vec::new();
        Request::Add {
            key: b"/y",
            delta: 3,
        }
        .encode(&mut add);
        s.receive(b, &add).unwrap();
        // b gets its ADD reply, a its STOP_WAITING.
        let out = drain(&mut s);
        assert!(out.contains(&(b, 3i64.to_le_bytes().to_vec())), "{out:?}");
        assert!(out.contains(&(a, vec![0])), "{out:?}");
        assert_eq!(s.waiting(), 0);
        // Present keys: answered at once.
        s.receive(a, &wait(&[b"/x"])).unwrap();
        assert_eq!(drain(&mut s), vec![(a, vec![0])]);
    }

    #[test]
    fn cancel_wait_replies_canceled_after_a_crossing_stop_waiting() {
        let mut s = server_with(2);
        let (a, b) = (ClientId(1), ClientId(2));
        s.receive(a, &wait(&[b"/k"])).unwrap();
        s.receive(a, &[Command::CancelWait as u8]).unwrap();
        assert_eq!(drain(&mut s), vec![(a, vec![1])]);
        // No longer waiting: a later SET sends a nothing.
        s.receive(b, &set(b"/k", b"")).unwrap();
        assert!(drain(&mut s).is_empty());
        // The race: the key arrives, then the cancel: a sees 0 then 1.
        s.receive(a, &wait(&[b"/k2"])).unwrap();
        s.receive(b, &set(b"/k2", b"")).unwrap();
        s.receive(a, &[Command::CancelWait as u8]).unwrap();
        assert_eq!(drain(&mut s), vec![(a, vec![0, 1])]);
    }

    #[test]
    fn a_second_wait_while_waiting_is_refused() {
        let mut s = server_with(1);
        let a = ClientId(1);
        s.receive(a, &wait(&[b"/k"])).unwrap();
        assert_eq!(
            s.receive(a, &wait(&[b"/j"])),
            Err(ServeError::AlreadyWaiting)
        );
    }

    #[test]
    fn a_queue_push_finishes_one_waiter() {
        let mut s = server_with(3);
        let (a, b, c) = (ClientId(1), ClientId(2), ClientId(3));
        s.receive(a, &wait(&[b"/q"])).unwrap();
        s.receive(b, &wait(&[b"/q"])).unwrap();
        let mut push = Vec::new();
        Request::QueuePush {
            key: b"/q",
            value: b"v",
        }
        .encode(&mut push);
        s.receive(c, &push).unwrap();
        assert_eq!(drain(&mut s), vec![(a, vec![0])]);
        s.receive(c, &push).unwrap();
        assert_eq!(drain(&mut s), vec![(b, vec![0])]);
    }

    #[test]
    fn a_disconnected_waiter_is_forgotten() {
        let mut s = server_with(2);
        let (a, b) = (ClientId(1), ClientId(2));
        s.receive(a, &wait(&[b"/k"])).unwrap();
        s.disconnect(a);
        s.receive(b, &set(b"/k", b"")).unwrap();
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.clients(), 1);
        assert_eq!(
            s.receive(a, &set(b"/k", b"")),
            Err(ServeError::UnknownClient(a))
        );
    }

    #[test]
    fn barrier_releases_everyone_at_the_world_size() {
        let mut s = server_with(3);
        let mut req = Vec::new();
        Request::Barrier {
            key: b"/b",
            world_size: 3,
        }
        .encode(&mut req);
        s.receive(ClientId(1), &req).unwrap();
        s.receive(ClientId(2), &req).unwrap();
        assert!(drain(&mut s).is_empty());
        s.receive(ClientId(3), &req).unwrap();
        let mut out = drain(&mut s);
        out.sort();
        assert_eq!(
            out,
            vec![
                (ClientId(1), vec![0]),
                (ClientId(2), vec![0]),
                (ClientId(3), vec![0])
            ]
        );
    }

    #[test]
    fn add_on_text_is_refused_and_changes_nothing() {
        let mut s = server_with(1);
        let a = ClientId(1);
        s.receive(a, &set(b"/t", b"text")).unwrap();
        let mut add = Vec::new();
        Request::Add {
            key: b"/t",
            delta: 1,
        }
        .encode(&mut add);
        assert!(matches!(s.receive(a, &add), Err(ServeError::NotANumber(_))));
        assert_eq!(s.data().get(b"/t"), Some(&b"text"[..]));
    }

    /// A request from a small alphabet of keys, so that they interact.
    fn request() -> impl Strategy<Value = Vec<u8>> {
        let key = prop::sample::select(vec![&b"/a"[..], b"/b", b"/c"]);
        let value = prop::collection::vec(any::<u8>(), 0..20);
        prop_oneof![
            (key.clone(), value.clone()).prop_map(|(k, v)| set(k, &v)),
            key.clone().prop_map(|k| {
                let mut b = Vec::new();
                Request::Get { key: k }.encode(&mut b);
                b
            }),
            (key.clone(), -5i64..5).prop_map(|(k, d)| {
                let mut b = Vec::new();
                Request::Add { key: k, delta: d }.encode(&mut b);
                b
            }),
            (key.clone(), value.clone(), value.clone()).prop_map(|(k, e, d)| {
                let mut b = Vec::new();
                Request::CompareSet {
                    key: k,
                    expected: &e,
                    desired: &d,
                }
                .encode(&mut b);
                b
            }),
            key.clone().prop_map(|k| {
                let mut b = Vec::new();
                Request::DeleteKey { key: k }.encode(&mut b);
                b
            }),
            (key.clone(), value).prop_map(|(k, v)| {
                let mut b = Vec::new();
                Request::QueuePush { key: k, value: &v }.encode(&mut b);
                b
            }),
            key.prop_map(|k| {
                let mut b = Vec::new();
                Request::QueuePop { key: k }.encode(&mut b);
                b
            }),
            Just(vec![Command::GetNumKeys as u8]),
            Just(vec![Command::ListKeys as u8]),
            any::<u32>().prop_map(|n| {
                let mut b = Vec::new();
                Request::Ping { nonce: n }.encode(&mut b);
                b
            }),
        ]
    }

    /// Feeds `bytes` to a fresh server in the given chunk sizes; returns what it sent
    /// and the final data, or the error.
    fn feed(bytes: &[u8], chunks: &[usize]) -> Result<(Vec<u8>, Data), ServeError> {
        let mut s = server_with(1);
        let a = ClientId(1);
        let mut pending = Vec::new();
        let mut out = Vec::new();
        let mut at = 0;
        let mut sizes = chunks.iter().cycle();
        while at < bytes.len() {
            let n = (*sizes.next().unwrap_or(&1)).clamp(1, bytes.len() - at);
            pending.extend_from_slice(&bytes[at..at + n]);
            at += n;
            let used = s.receive(a, &pending)?;
            pending.drain(..used);
            for (_, b) in drain(&mut s) {
                out.extend(b);
            }
        }
        assert!(pending.is_empty(), "every request complete at the end");
        Ok((out, s.data().clone()))
    }

    proptest! {
        #[test]
        fn any_split_of_the_input_gives_the_same_replies(
            reqs in prop::collection::vec(request(), 1..40),
            chunks in prop::collection::vec(1usize..40, 1..8),
        ) {
            let bytes: Vec<u8> = reqs.concat();
            let whole = feed(&bytes, &[bytes.len()]);
            let split = feed(&bytes, &chunks);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_errors_close_only_that_client(
            junk in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut s = server_with(2);
            let (a, b) = (ClientId(1), ClientId(2));
            if s.receive(a, &junk).is_err() {
                s.disconnect(a);
            }
            // The other client is served as before.
            let mut ping = Vec::new();
            Request::Ping { nonce: 9 }.encode(&mut ping);
            s.receive(b, &ping).unwrap();
            let out: Vec<_> = drain(&mut s).into_iter().filter(|(c, _)| *c == b).collect();
            prop_assert_eq!(out, vec![(b, 9u32.to_le_bytes().to_vec())]);
        }
    }
}
