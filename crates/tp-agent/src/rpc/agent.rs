//! [`Agent`]: calls between the workers of a group, over pipes.
//!
//! How a call flows:
//!
//! 1. [`Agent::send`] places the tensors by the device map, takes an id, records the
//!    call as pending (with its deadline in the one timer), and writes it on the pipe
//!    to the peer — opened on first use, and opened again after a failure.
//! 2. The callee's pipe reader (a task on its context's I/O thread) reads the request
//!    and hands it to the worker pool; the handler runs there, never on the I/O thread,
//!    and its reply (or its error, or its panic) goes back with the request's id.
//! 3. The caller's pipe reader matches the reply to the pending call by id and
//!    completes its future. A reply for a call that already timed out is dropped; a
//!    failed pipe fails every call pending on it.
//!
//! Shutdown ([`Agent::shutdown`]) is PyTorch's: in a static group, every worker waits
//! through the store until no worker has a call in flight (the call-count barrier),
//! then closes; a dynamic worker leaves: it tells every member, each of which stops
//! calling it and answers once its own calls to it are over.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::channel::oneshot;
use tp_channel::Device;
use tp_store::{Store, StoreError};
use tp_wire::rpc::RpcKind;

use super::devices::Devices;
use super::message::{
    self, CallError, ReadError, Received, Reply, Request, RpcMessage, header, reply_targets,
    request_targets, to_pipe,
};
use super::pool::{Pool, on_pool_thread};
use super::timer::Timer;
use super::{AgentOptions, Group, Handler, OptionsError, RendezvousError, rendezvous};
use crate::context::{Context, ContextError, ListenError};
use crate::pipe::{OpError, Pipe};

/// Why an agent could not start.
#[non_exhaustive]
#[derive(Debug)]
pub enum AgentError {
    /// The options are wrong.
    Options(OptionsError),
    /// The context could not be built, or none of the chosen transports is viable.
    Context(String),
    /// Listening failed.
    Listen(ListenError),
    /// This worker's own published address does not reach it.
    Unreachable {
        /// The URL.
        url: String,
        /// What connecting to it said.
        error: String,
    },
    /// The rendezvous failed.
    Rendezvous(RendezvousError),
    /// A thread could not be started.
    Thread(std::io::Error),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Options(e) => write!(f, "bad RPC agent options: {e}"),
            Self::Context(e) => write!(f, "RPC agent: {e}"),
            Self::Listen(e) => write!(f, "RPC agent could not listen: {e}"),
            Self::Unreachable { url, error } => write!(
                f,
                "this worker's address {url} does not reach it ({error}); peers could not \
                 call it. Set TP_SOCKET_IFNAME to the interface peers reach this machine \
                 on, or AgentOptions::address"
            ),
            Self::Rendezvous(e) => e.fmt(f),
            Self::Thread(e) => write!(f, "RPC agent could not start a thread: {e}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// Why a graceful shutdown could not be graceful (the agent is closed anyway).
#[non_exhaustive]
#[derive(Debug)]
pub enum ShutdownError {
    /// The store failed or timed out during the call-count barrier or the leave (a
    /// worker that died, or never came, keeps the others from agreeing).
    Store(StoreError),
    /// Calls were still in flight when the wait for them timed out.
    CallsInFlight {
        /// How many.
        calls: usize,
        /// How long it waited.
        waited: Duration,
    },
}

impl std::fmt::Display for ShutdownError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Store(e) => write!(f, "graceful shutdown failed, closed anyway: {e}"),
            Self::CallsInFlight { calls, waited } => write!(
                f,
                "graceful shutdown: {calls} calls still in flight after {:.1} s; closed anyway",
                waited.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for ShutdownError {}

impl From<RendezvousError> for ShutdownError {
    fn from(e: RendezvousError) -> Self {
        match e {
            RendezvousError::Store(e) => Self::Store(e),
            other => Self::Store(StoreError::Backend {
                op: "leave",
                reason: other.to_string(),
            }),
        }
    }
}

impl From<StoreError> for ShutdownError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Per-peer network data (PyTorch's `getNetworkData`), from the caller's side.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct NetworkData {
    /// Calls made to the peer.
    pub num_calls: u64,
    /// Request bytes sent (payloads and tensors).
    pub total_sent_bytes: u64,
    /// Reply bytes received.
    pub total_recv_bytes: u64,
    /// Calls that failed (timeouts, pipe failures, handler errors).
    pub total_errors: u64,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq, PartialOrd, Ord)]
enum Phase {
    /// Calls go out.
    Running,
    /// Past the shutdown barrier (or leaving): no new calls.
    Stopping,
    /// Closed.
    Closed,
}

struct Pending {
    peer: String,
    generation: u64,
    deadline: Option<Instant>,
    timeout: Duration,
    tx: oneshot::Sender<Result<RpcMessage, CallError>>,
}

struct Client {
    pipe: Arc<Pipe>,
    generation: u64,
    url: String,
}

#[derive(Default)]
struct Peer {
    active: usize,
    data: NetworkData,
}

struct State {
    phase: Phase,
    group: Group,
    /// Dynamic peers that announced they are leaving.
    gone: BTreeSet<String>,
    clients: HashMap<String, Client>,
    pending: HashMap<u64, Pending>,
    peers: BTreeMap<String, Peer>,
    client_active: usize,
    server_active: usize,
    server_async: usize,
    late_replies: u64,
    timeouts: u64,
    next_generation: u64,
    /// Pipes this agent accepted, to close on shutdown.
    served: Vec<Weak<Pipe>>,
}

struct Inner {
    opts: AgentOptions,
    ctx: Arc<Context>,
    store: Arc<dyn Store>,
    url: String,
    handler: Arc<dyn Handler>,
    pool: Pool,
    timer: Timer,
    state: Mutex<State>,
    /// Signalled whenever a call count drops.
    quiet: Condvar,
    next_id: AtomicU64,
    barrier_round: AtomicU64,
    listener: Arc<crate::Listener>,
    /// Where received tensors are put.
    devices: Arc<Devices>,
}

/// An RPC agent: one worker of a group. See the [module docs](self).
///
/// Dropping it shuts it down at once ([`shutdown_now`](Self::shutdown_now)); call
/// [`shutdown`](Self::shutdown) first for the graceful way.
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.inner.opts.name)
            .field("rank", &self.inner.opts.rank)
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts worker `opts.name`: checks the options, listens on every chosen transport,
    /// checks that its own address reaches it, joins the group through `store`, and
    /// serves calls with `handler`.
    ///
    /// The store's timeout bounds the rendezvous and the shutdown barrier (PyTorch sets
    /// it to the RPC timeout). A failure leaves nothing running.
    ///
    /// # Errors
    /// [`AgentError`], naming what went wrong.
    pub fn start(
        opts: AgentOptions,
        store: Arc<dyn Store>,
        handler: impl Handler,
    ) -> Result<Self, AgentError> {
        let mut builder = Context::builder(opts.name.clone());
        let (t, c) = (builder.transport_names(), builder.channel_names());
        let t: Vec<&str> = t.iter().map(String::as_str).collect();
        let c: Vec<&str> = c.iter().map(String::as_str).collect();
        let devices = Arc::new(Devices::probe());
        opts.validate(&t, &c, &devices.local())
            .map_err(AgentError::Options)?;
        if let Some(list) = &opts.transports {
            builder = builder.use_transports(list);
        }
        if let Some(list) = &opts.channels {
            builder = builder.use_channels(list);
        }
        let ctx = Arc::new(
            builder
                .build()
                .map_err(|e: ContextError| AgentError::Context(e.to_string()))?,
        );
        if ctx.transports().is_empty() || ctx.channels().is_empty() {
            ctx.close();
            return Err(AgentError::Context(format!(
                "no viable transport or channel among those chosen (skipped: {:?})",
                ctx.skipped()
            )));
        }
        let result = Self::start_on(opts, store, Arc::new(handler), &ctx, devices);
        if result.is_err() {
            ctx.close(); // nothing left running after a failed start
        }
        result
    }

    fn start_on(
        opts: AgentOptions,
        store: Arc<dyn Store>,
        handler: Arc<dyn Handler>,
        ctx: &Arc<Context>,
        devices: Arc<Devices>,
    ) -> Result<Self, AgentError> {
        // Listen on every transport; publish the lowest-priority one (tcp), as PyTorch.
        let urls: Vec<String> = ctx
            .transports()
            .iter()
            .map(|t| match (t.name.as_str(), &opts.address) {
                ("tcp", Some(host)) if host.contains(':') => format!("tcp://[{host}]:0"),
                ("tcp", Some(host)) => format!("tcp://{host}:0"),
                (name, _) => format!("{name}://"),
            })
            .collect();
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        let listener = ctx.listen(&refs).map_err(AgentError::Listen)?;
        let url = listener.urls().last().cloned().unwrap_or_default();
        check_reachable(&url)?;
        let group = rendezvous::join(&*store, &opts, &url).map_err(AgentError::Rendezvous)?;
        let pool = Pool::start(&opts.name, opts.num_worker_threads).map_err(AgentError::Thread)?;
        // The timer fires into the agent, which does not exist yet: it finds it here.
        let agent: Arc<std::sync::OnceLock<Weak<Inner>>> = Arc::default();
        let found = agent.clone();
        let timer = Timer::start(&opts.name, move |id| {
            if let Some(inner) = found.get().and_then(Weak::upgrade) {
                inner.expire(id);
            }
        })
        .map_err(AgentError::Thread)?;
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| {
            let _ = agent.set(weak.clone());
            Inner {
                opts,
                ctx: ctx.clone(),
                store,
                url,
                handler,
                pool,
                timer,
                state: Mutex::new(State {
                    phase: Phase::Running,
                    group,
                    gone: BTreeSet::new(),
                    clients: HashMap::new(),
                    pending: HashMap::new(),
                    peers: BTreeMap::new(),
                    client_active: 0,
                    server_active: 0,
                    server_async: 0,
                    late_replies: 0,
                    timeouts: 0,
                    next_generation: 0,
                    served: Vec::new(),
                }),
                quiet: Condvar::new(),
                next_id: AtomicU64::new(0),
                barrier_round: AtomicU64::new(0),
                listener: Arc::new(listener),
                devices,
            }
        });
        drop(ctx.spawn(accept_loop(
            Arc::downgrade(&inner),
            inner.listener.clone(),
            inner.opts.max_message_bytes,
            inner.devices.clone(),
        )));
        Ok(Self { inner })
    }

    /// This worker's name.
    pub fn name(&self) -> &str {
        &self.inner.opts.name
    }

    /// This worker's rank.
    pub fn rank(&self) -> u32 {
        self.inner.opts.rank
    }

    /// The URL this worker published (`addrs/<name>` in the store).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The context the agent's pipes run on (its transports and channels).
    pub fn context(&self) -> &Arc<Context> {
        &self.inner.ctx
    }

    /// The group's workers, rank → name: a static group's, or a dynamic group's members
    /// now (read from the store).
    pub fn workers(&self) -> BTreeMap<u32, String> {
        if self.inner.opts.world_size.is_none()
            && let Ok(m) = rendezvous::members(&*self.inner.store)
        {
            return m;
        }
        self.inner.lock().group.names.clone()
    }

    /// Calls `to` with `message`; resolves to the reply. `timeout`: `None` = the
    /// agent's default (`AgentOptions::rpc_timeout`), zero = never.
    ///
    /// The first call to a peer opens a pipe to it (in a dynamic group, looking its
    /// address up in the store, which may wait for it); after that pipe fails, the next
    /// call opens a new one.
    pub fn send(&self, to: &str, message: RpcMessage, timeout: Option<Duration>) -> Call {
        let timeout = timeout.unwrap_or(self.inner.opts.rpc_timeout);
        match self
            .inner
            .start_call(to, message, RpcKind::Request, timeout)
        {
            Ok((id, rx)) => Call {
                id: Some(id),
                state: CallState::Waiting(rx),
            },
            Err(e) => Call {
                id: None,
                state: CallState::Failed(Some(e)),
            },
        }
    }

    /// PyTorch's metrics: `agent.thread_pool_size`, `agent.num_idle_threads`,
    /// `agent.client_active_calls`, `agent.server_active_calls`,
    /// `agent.server_active_async_calls`; and tp's `agent.late_replies_dropped`,
    /// `agent.calls_timed_out`.
    pub fn metrics(&self) -> BTreeMap<String, u64> {
        let s = self.inner.lock();
        let n = |v: usize| v as u64;
        BTreeMap::from([
            ("agent.thread_pool_size".into(), n(self.inner.pool.size())),
            ("agent.num_idle_threads".into(), n(self.inner.pool.idle())),
            ("agent.client_active_calls".into(), n(s.client_active)),
            ("agent.server_active_calls".into(), n(s.server_active)),
            ("agent.server_active_async_calls".into(), n(s.server_async)),
            ("agent.late_replies_dropped".into(), s.late_replies),
            ("agent.calls_timed_out".into(), s.timeouts),
        ])
    }

    /// Per-peer network data: calls made to each peer, bytes each way, errors.
    pub fn network_data(&self) -> BTreeMap<String, NetworkData> {
        self.inner
            .lock()
            .peers
            .iter()
            .map(|(name, p)| (name.clone(), p.data))
            .collect()
    }

    /// Graceful shutdown. A static group: waits until this worker has no call in
    /// flight, then through the store until no worker has (the call-count barrier,
    /// repeated while calls keep being made), then closes. A dynamic group: leaves —
    /// each member is told, stops calling this worker and answers once its own calls
    /// to it are over; this worker answers what it was asked, and closes.
    ///
    /// Every wait is bounded by the store's timeout; past it the agent closes anyway
    /// and says why. Blocking: call it from a plain thread, not from a handler or the
    /// context's I/O thread. Idempotent.
    ///
    /// # Errors
    /// [`ShutdownError`]: what kept it from being graceful.
    pub fn shutdown(&self) -> Result<(), ShutdownError> {
        let inner = &self.inner;
        if inner.lock().phase != Phase::Running {
            inner.close();
            return Ok(());
        }
        let result = if inner.opts.world_size.is_some() {
            inner.barrier_until_quiet()
        } else {
            inner.leave()
        };
        inner.close();
        result
    }

    /// Closes at once: pending calls fail with [`CallError::Shutdown`], pipes and the
    /// listener close, the worker pool finishes what it was running. Idempotent.
    pub fn shutdown_now(&self) {
        self.inner.close();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.inner.close();
    }
}

/// Connects to `url` once to see that it reaches this machine (pain point: a guessed
/// address that peers cannot use).
fn check_reachable(url: &str) -> Result<(), AgentError> {
    let Some(addr) = url.strip_prefix("tcp://") else {
        return Ok(());
    };
    let unreachable = |error: String| AgentError::Unreachable {
        url: url.to_string(),
        error,
    };
    let sa: std::net::SocketAddr = addr.parse().map_err(|e| unreachable(format!("{e}")))?;
    std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5))
        .map(drop)
        .map_err(|e| unreachable(e.to_string()))
}

/// A call in flight: resolves to the reply or the error. Dropping it abandons the
/// result, not the call.
#[must_use = "a call's reply is only seen by awaiting it"]
pub struct Call {
    id: Option<u64>,
    state: CallState,
}

enum CallState {
    Failed(Option<CallError>),
    Waiting(oneshot::Receiver<Result<RpcMessage, CallError>>),
}

impl Call {
    /// The call's id (`None` when it failed before it was sent).
    pub fn id(&self) -> Option<u64> {
        self.id
    }
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").field("id", &self.id).finish()
    }
}

impl Future for Call {
    type Output = Result<RpcMessage, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let id = self.id.unwrap_or(0);
        match &mut self.state {
            CallState::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(CallError::Shutdown {
                id,
                peer: String::new(),
            }))),
            CallState::Waiting(rx) => rx.poll_unpin(cx).map(|r| {
                r.unwrap_or_else(|_| {
                    Err(CallError::Shutdown {
                        id,
                        peer: String::new(),
                    })
                })
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The URL of `to`, looking a dynamic group's newcomer up in the store.
    fn resolve(&self, to: &str) -> Result<String, CallError> {
        let unknown = || CallError::UnknownPeer {
            worker: self.opts.name.clone(),
            rank: self.opts.rank,
            peer: to.to_string(),
        };
        {
            let s = self.lock();
            if let Some(url) = s.group.addrs.get(to)
                && !s.gone.contains(to)
            {
                return Ok(url.clone());
            }
        }
        // Not cached: a static group's member whose pipe failed (it may be back at a
        // new address), or a dynamic group's newcomer (or returner).
        let listed = if self.opts.world_size.is_some() {
            self.lock().group.names.values().any(|n| n == to)
        } else {
            rendezvous::members(&*self.store)
                .map(|m| m.values().any(|n| n == to))
                .unwrap_or(false)
        };
        if !listed {
            let s = self.lock();
            return Err(if s.gone.contains(to) {
                CallError::PeerLeft {
                    peer: to.to_string(),
                }
            } else {
                unknown()
            });
        }
        let url = rendezvous::address(&*self.store, to).map_err(|_| unknown())?;
        let mut s = self.lock();
        s.gone.remove(to);
        s.group.addrs.insert(to.to_string(), url.clone());
        Ok(url)
    }

    /// Sends a request (or a leave notice) and records it as pending.
    fn start_call(
        self: &Arc<Self>,
        to: &str,
        msg: RpcMessage,
        kind: RpcKind,
        timeout: Duration,
    ) -> Result<(u64, oneshot::Receiver<Result<RpcMessage, CallError>>), CallError> {
        let not_running = || CallError::NotRunning {
            worker: self.opts.name.clone(),
        };
        if self.lock().phase != Phase::Running && kind == RpcKind::Request {
            return Err(not_running());
        }
        let targets = request_targets(&msg, to, self.opts.device_maps.get(to))?;
        let url = self.resolve(to)?;
        let bytes = msg.len();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let started = Instant::now();
        let deadline = (!timeout.is_zero()).then(|| started + timeout);
        let pipe = {
            let mut s = self.lock();
            if s.phase == Phase::Closed || (s.phase != Phase::Running && kind == RpcKind::Request) {
                return Err(not_running());
            }
            let client = match s.clients.get(to) {
                Some(c) => c,
                None => {
                    let pipe = Arc::new(self.ctx.connect(&url).map_err(|e| CallError::Pipe {
                        id,
                        peer: to.to_string(),
                        url: url.clone(),
                        error: e.to_string(),
                    })?);
                    let generation = s.next_generation;
                    s.next_generation += 1;
                    drop(self.ctx.spawn(client_loop(
                        Arc::downgrade(self),
                        to.to_string(),
                        generation,
                        pipe.clone(),
                    )));
                    s.clients.entry(to.to_string()).or_insert(Client {
                        pipe,
                        generation,
                        url,
                    })
                }
            };
            let (pipe, generation) = (client.pipe.clone(), client.generation);
            s.pending.insert(
                id,
                Pending {
                    peer: to.to_string(),
                    generation,
                    deadline,
                    timeout,
                    tx,
                },
            );
            s.client_active += 1;
            let peer = s.peers.entry(to.to_string()).or_default();
            peer.active += 1;
            peer.data.num_calls += 1;
            peer.data.total_sent_bytes += bytes;
            pipe
        };
        if let Some(at) = deadline {
            self.timer.add(at, id);
        }
        let write = pipe.write(to_pipe(header(kind, id), msg, &targets));
        // The pipe completes the write by itself; a failed pipe fails its reads too,
        // and the reader fails every call pending on it. Only a refusal is immediate.
        if let Some((_, Err(OpError::Command(e)))) = write.now_or_never() {
            self.finish(
                id,
                None,
                Err(CallError::Refused {
                    peer: to.to_string(),
                    error: e.to_string(),
                }),
            );
        }
        Ok((id, rx))
    }

    /// Completes call `id` once: with the reply from pipe generation `from` (ignored if
    /// the call went out on another pipe), or with an error (`from` = `None`).
    fn finish(&self, id: u64, from: Option<u64>, result: Result<RpcMessage, CallError>) {
        let mut s = self.lock();
        let Some(p) = s.pending.get(&id) else {
            if from.is_some() {
                s.late_replies += 1;
                tracing::debug!(id, "RPC reply after the call timed out; dropped");
            }
            return;
        };
        if from.is_some_and(|g| g != p.generation) {
            return; // not the pipe this call went on: not its reply
        }
        let Some(p) = s.pending.remove(&id) else {
            return;
        };
        s.client_active -= 1;
        // start_call created the entry; entries are never removed.
        if let Some(peer) = s.peers.get_mut(&p.peer) {
            peer.active -= 1;
            match &result {
                Ok(m) => peer.data.total_recv_bytes += m.len(),
                Err(_) => peer.data.total_errors += 1,
            }
        }
        if matches!(result, Err(CallError::Timeout { .. })) {
            s.timeouts += 1;
        }
        drop(s);
        self.quiet.notify_all();
        if let Some(at) = p.deadline {
            self.timer.remove(at, id);
        }
        let _ = p.tx.send(result);
    }

    fn expire(&self, id: u64) {
        let Some((peer, timeout)) = self
            .lock()
            .pending
            .get(&id)
            .map(|p| (p.peer.clone(), p.timeout))
        else {
            return;
        };
        self.finish(id, None, Err(CallError::Timeout { id, peer, timeout }));
    }

    /// The pipe of generation `generation` to `peer` failed: every call on it fails,
    /// and the next call opens a new pipe.
    fn pipe_failed(&self, peer: &str, generation: u64, error: &ReadError) {
        let (ids, url, quiet) = {
            let mut s = self.lock();
            let url = match s.clients.get(peer) {
                Some(c) if c.generation == generation => {
                    // Look the address up again next time: the peer may come back elsewhere.
                    s.group.addrs.remove(peer);
                    s.clients.remove(peer).map(|c| c.url).unwrap_or_default()
                }
                _ => s.group.addrs.get(peer).cloned().unwrap_or_default(),
            };
            let ids: Vec<u64> = s
                .pending
                .iter()
                .filter(|(_, p)| p.generation == generation && p.peer == peer)
                .map(|(&id, _)| id)
                .collect();
            let quiet = s.phase != Phase::Running || s.gone.contains(peer);
            (ids, url, quiet)
        };
        if quiet {
            tracing::debug!(peer, %error, "RPC pipe closed");
        } else if !ids.is_empty() || !matches!(error, ReadError::Pipe(_)) {
            tracing::warn!(peer, %error, calls = ids.len(), "RPC pipe failed; its calls fail");
        }
        for id in ids {
            self.finish(
                id,
                None,
                Err(CallError::Pipe {
                    id,
                    peer: peer.to_string(),
                    url: url.clone(),
                    error: error.to_string(),
                }),
            );
        }
    }

    /// Runs a request on the worker pool and writes its reply.
    fn dispatch(self: &Arc<Self>, pipe: Arc<Pipe>, from: String, got: Received) {
        self.lock().server_active += 1;
        let handler = self.handler.clone();
        let weak = Arc::downgrade(self);
        self.pool.spawn(async move {
            let id = got.header.id;
            let arrived: Vec<Device> = got.message.devices().collect();
            let request = Request {
                from: from.clone(),
                id,
                message: got.message,
            };
            let reply = std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(request)));
            let result = match reply {
                Ok(Reply::Ready(r)) => r,
                Ok(Reply::Later(fut)) => {
                    if let Some(i) = weak.upgrade() {
                        i.lock().server_async += 1;
                    }
                    let r = AssertUnwindSafe(fut)
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|p| Err(panic_text(&*p)));
                    if let Some(i) = weak.upgrade() {
                        i.lock().server_async -= 1;
                    }
                    r
                }
                Err(p) => Err(panic_text(&*p)),
            };
            let out = result.and_then(|m| {
                let targets =
                    reply_targets(&m, &got.sources, &arrived).map_err(|e| e.to_string())?;
                Ok(to_pipe(header(RpcKind::Response, id), m, &targets))
            });
            let out = out.unwrap_or_else(|text| {
                to_pipe(header(RpcKind::Error, id), RpcMessage::new(text), &[])
            });
            let (_, written) = pipe.write(out).await;
            if let Err(e) = written {
                tracing::debug!(peer = from, id, error = %e, "RPC reply not delivered");
            }
            if let Some(i) = weak.upgrade() {
                i.lock().server_active -= 1;
                i.quiet.notify_all();
            }
        });
    }

    /// A peer is leaving: stop calling it, wait for our calls to it, then answer.
    fn on_leave(self: &Arc<Self>, pipe: Arc<Pipe>, from: String, id: u64) {
        {
            let mut s = self.lock();
            s.gone.insert(from.clone());
            s.group.addrs.remove(&from);
            s.group.names.retain(|_, n| *n != from);
        }
        let weak = Arc::downgrade(self);
        self.pool.spawn(async move {
            if let Some(inner) = weak.upgrade() {
                let limit = inner.opts.rpc_timeout;
                let _ = inner.wait_quiet(limit, |s| s.peers.get(&from).map_or(0, |p| p.active));
                inner.lock().clients.remove(&from);
            }
            let (_, r) = pipe
                .write(to_pipe(
                    header(RpcKind::Response, id),
                    RpcMessage::default(),
                    &[],
                ))
                .await;
            if let Err(e) = r {
                tracing::debug!(peer = from, error = %e, "leave acknowledgement not delivered");
            }
        });
    }

    /// Waits until `count` is zero, up to `limit` (zero: forever); the count at the end.
    fn wait_quiet(&self, limit: Duration, count: impl Fn(&State) -> usize) -> usize {
        let start = Instant::now();
        let mut s = self.lock();
        loop {
            let n = count(&s);
            if n == 0 {
                return 0;
            }
            let left = if limit.is_zero() {
                Duration::from_secs(3600)
            } else {
                match limit.checked_sub(start.elapsed()) {
                    Some(d) if !d.is_zero() => d,
                    _ => return n,
                }
            };
            s = self
                .quiet
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn wait_no_client_calls(&self) -> Result<(), ShutdownError> {
        let limit = self.store.timeout();
        let left = self.wait_quiet(limit, |s| s.client_active);
        if left > 0 {
            return Err(ShutdownError::CallsInFlight {
                calls: left,
                waited: limit,
            });
        }
        Ok(())
    }

    /// PyTorch's `join(shutdown=true)`: rounds of the call-count barrier until a round
    /// sums to zero, then one more barrier after which no worker makes new calls.
    fn barrier_until_quiet(&self) -> Result<(), ShutdownError> {
        let world = u64::from(self.opts.world_size.unwrap_or(1));
        loop {
            self.wait_no_client_calls()?;
            let active = self.lock().client_active as u64;
            if self.sync_call_count(world, active)? == 0 {
                self.lock().phase = Phase::Stopping;
                self.sync_call_count(world, 0)?;
                return Ok(());
            }
        }
    }

    /// One round of the call-count barrier: adds this worker's active calls, waits for
    /// every worker, and returns the sum (PyTorch's `syncCallCount`, same keys).
    fn sync_call_count(&self, world: u64, active: u64) -> Result<u64, ShutdownError> {
        let k = self.barrier_round.fetch_add(1, Ordering::Relaxed);
        let calls = format!("shutdown/ACTIVE_CALLS_ID_{k}");
        let count = format!("shutdown/PROCESS_COUNT_ID_{k}");
        let ready = format!("shutdown/READY_ID_{k}");
        let store = &*self.store;
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        store.add(&calls, as_i64(active))?;
        if store.add(&count, 1)? == as_i64(world) {
            store.set(&ready, b"1")?;
        }
        store.wait(&[&ready], None)?;
        Ok(u64::try_from(store.add(&calls, 0)?).unwrap_or(0))
    }

    /// Leaves a dynamic group, under the membership token.
    fn leave(self: &Arc<Self>) -> Result<(), ShutdownError> {
        let store = self.store.clone();
        let me = self.opts.name.clone();
        rendezvous::with_token(&*store, &me, "leave", || -> Result<(), ShutdownError> {
            // No one finds this worker any more; its own calls finish.
            rendezvous::unlist(&*store, &self.opts)?;
            self.wait_no_client_calls()?;
            // Each member stops calling this worker and answers once its calls are over.
            let members = rendezvous::members(&*store)?;
            let notices: Vec<(String, Result<(u64, _), CallError>)> = members
                .values()
                .filter(|n| **n != me)
                .map(|n| {
                    let r = self.start_call(
                        n,
                        RpcMessage::default(),
                        RpcKind::Leave,
                        self.opts.rpc_timeout,
                    );
                    (n.clone(), r)
                })
                .collect();
            self.lock().phase = Phase::Stopping;
            for (peer, r) in notices {
                let r = match r {
                    Ok((_, rx)) => futures::executor::block_on(rx)
                        .unwrap_or_else(|_| Err(CallError::NotRunning { worker: me.clone() })),
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    tracing::warn!(peer, error = %e, "leaving: a member did not acknowledge");
                }
            }
            Ok(rendezvous::forget_address(&*store, &self.opts)?)
        })?;
        // Calls members made before they stopped are answered before closing.
        let left = self.wait_quiet(self.store.timeout(), |s| s.server_active);
        if left > 0 {
            return Err(ShutdownError::CallsInFlight {
                calls: left,
                waited: self.store.timeout(),
            });
        }
        Ok(())
    }

    /// Closes locally (idempotent): new calls are refused, pending ones fail, pipes and
    /// listeners close, the I/O thread's tasks end, the pool drains.
    fn close(&self) {
        let (ids, served) = {
            let mut s = self.lock();
            if s.phase == Phase::Closed {
                return;
            }
            s.phase = Phase::Closed;
            let ids: Vec<(u64, String)> = s
                .pending
                .iter()
                .map(|(&id, p)| (id, p.peer.clone()))
                .collect();
            (ids, std::mem::take(&mut s.served))
        };
        for (id, peer) in ids {
            self.finish(id, None, Err(CallError::Shutdown { id, peer }));
        }
        self.timer.stop();
        self.listener.close();
        for p in served.iter().filter_map(Weak::upgrade) {
            p.close();
        }
        self.lock().clients.clear();
        // PyTorch's order: the context first (no new work arrives), then the pool.
        let join = self.ctx.join();
        if !on_pool_thread() && !crate::runtime::on_runtime_thread() {
            let bounded = futures::future::select(
                Box::pin(join),
                Box::pin(async_io::Timer::after(Duration::from_secs(10))),
            );
            if let futures::future::Either::Right(_) = futures::executor::block_on(bounded) {
                tracing::warn!(
                    worker = self.opts.name,
                    "RPC agent: I/O still busy 10 s after close"
                );
            }
        }
        self.pool.close(Duration::from_secs(10));
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into());
    format!("the handler panicked: {what}")
}

/// Accepts pipes and serves each (holds the listener, not the agent).
async fn accept_loop(
    weak: Weak<Inner>,
    listener: Arc<crate::Listener>,
    max: u64,
    devices: Arc<Devices>,
) {
    while let Ok(pipe) = listener.accept().await {
        let Some(inner) = weak.upgrade() else { return };
        let pipe = Arc::new(pipe);
        {
            let mut s = inner.lock();
            s.served.retain(|p| p.strong_count() > 0);
            s.served.push(Arc::downgrade(&pipe));
        }
        drop(
            inner
                .ctx
                .spawn(serve_loop(weak.clone(), pipe, max, devices.clone())),
        );
    }
}

/// Reads a caller's requests from one accepted pipe.
async fn serve_loop(weak: Weak<Inner>, pipe: Arc<Pipe>, max: u64, devices: Arc<Devices>) {
    loop {
        let got = message::read(&pipe, max, &devices).await;
        let Some(inner) = weak.upgrade() else { return };
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                if inner.lock().phase == Phase::Running && !matches!(e, ReadError::Pipe(_)) {
                    tracing::warn!(peer = pipe.remote_name(), error = %e, "RPC: closed a pipe");
                } else {
                    tracing::debug!(peer = pipe.remote_name(), error = %e, "RPC: a caller's pipe closed");
                }
                pipe.close();
                return;
            }
        };
        let from = pipe.remote_name();
        match got.header.kind {
            RpcKind::Request => inner.dispatch(pipe.clone(), from, got),
            RpcKind::Leave => inner.on_leave(pipe.clone(), from, got.header.id),
            RpcKind::Response | RpcKind::Error => {
                tracing::warn!(peer = from, "RPC: a reply on a caller's pipe; closing it");
                pipe.close();
                return;
            }
        }
    }
}

/// Reads replies from the pipe this agent opened to `peer`.
async fn client_loop(weak: Weak<Inner>, peer: String, generation: u64, pipe: Arc<Pipe>) {
    let (max, devices) = match weak.upgrade() {
        Some(i) => (i.opts.max_message_bytes, i.devices.clone()),
        None => return,
    };
    loop {
        let got = message::read(&pipe, max, &devices).await;
        let Some(inner) = weak.upgrade() else { return };
        match got {
            Ok(got) => {
                let id = got.header.id;
                let result = match got.header.kind {
                    RpcKind::Response => Ok(got.message),
                    RpcKind::Error => Err(CallError::Remote {
                        peer: peer.clone(),
                        message: String::from_utf8_lossy(&got.message.payload).into_owned(),
                    }),
                    RpcKind::Request | RpcKind::Leave => {
                        pipe.close();
                        inner.pipe_failed(
                            &peer,
                            generation,
                            &ReadError::Malformed("a request on a reply pipe".into()),
                        );
                        return;
                    }
                };
                inner.finish(id, Some(generation), result);
            }
            Err(e) => {
                pipe.close();
                inner.pipe_failed(&peer, generation, &e);
                return;
            }
        }
    }
}
