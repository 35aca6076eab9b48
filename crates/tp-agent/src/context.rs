//! [`Context`]: the registries of transports and channels a pipe chooses from.
//!
//! A context holds every backend compiled in (cargo features `tcp`, `shm`, `ibv`,
//! `basic`, `xth`, `cma`, `mpt`, `cuda`), each with a priority; the pipe handshake picks the
//! highest-priority transport both ends share and, per device pair, the
//! highest-priority channel whose descriptors match. A backend that is not viable on
//! this machine is left out, and the reason is logged (`tracing`, level INFO) and kept
//! ([`Context::skipped`]).
//!
//! Default priorities follow PyTorch's TensorPipe agent: transports shm 200, ibv 100,
//! tcp 0; channels cma 1200, mpt 1100, basic 1000, cuda_xth 400, cuda_ipc 300, cuda_gdr
//! 200, cuda_basic 0 (CPU channels rank above CUDA ones, so CPU ↔ CPU never goes
//! through a CUDA channel; without a GPU the CUDA channels are skipped as not viable,
//! with the reason). PyTorch does not register xth; here
//! it gets 1300, so two pipes inside one process — the only place xth's descriptor
//! matches — use a plain memcpy. [`ContextBuilder::priority`] overrides any of them, and
//! naming a backend the build does not have is an error, not a silent no-op.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tp_channel::ChannelContext;
use tp_transport::Transport;
use tp_wire::packet::OwnedDeviceDescriptor;
use tp_wire::pipe::{LocalChannel, LocalOffer, LocalTransport, PipeConfig};

/// Why a context could not be built, or a URL not used.
#[non_exhaustive]
#[derive(Debug, Clone, Eq, PartialEq)]
pub enum ContextError {
    /// A priority was given for a backend this build does not know.
    UnknownBackend {
        /// The name given.
        name: String,
        /// The names known.
        known: Vec<String>,
    },
    /// Two backends were registered under one name.
    DuplicateBackend(String),
    /// A URL that is not `scheme://address`.
    MalformedUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A URL whose scheme names no transport of this context.
    UnknownScheme {
        /// The URL.
        url: String,
        /// The transports this context has.
        known: Vec<String>,
    },
}

impl fmt::Display for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownBackend { name, known } => write!(
                f,
                "unknown backend {name:?} (this build has: {})",
                known.join(", ")
            ),
            Self::DuplicateBackend(name) => write!(f, "backend {name:?} registered twice"),
            Self::MalformedUrl { url, reason } => write!(f, "malformed URL {url:?}: {reason}"),
            Self::UnknownScheme { url, known } => write!(
                f,
                "URL {url:?} names no transport of this context (it has: {})",
                known.join(", ")
            ),
        }
    }
}

impl std::error::Error for ContextError {}

/// A registered transport.
#[derive(Clone)]
pub struct TransportEntry {
    /// Its name (also the URL scheme).
    pub name: String,
    /// Higher is preferred.
    pub priority: i64,
    /// The transport context.
    pub transport: Arc<dyn Transport>,
}

/// A registered channel.
#[derive(Clone)]
pub struct ChannelEntry {
    /// Its name.
    pub name: String,
    /// Higher is preferred.
    pub priority: i64,
    /// The channel context.
    pub channel: Arc<dyn ChannelContext>,
}

impl fmt::Debug for TransportEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.priority)
    }
}

impl fmt::Debug for ChannelEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.priority)
    }
}

/// Builds a [`Context`].
pub struct ContextBuilder {
    name: String,
    transports: Vec<TransportEntry>,
    channels: Vec<ChannelEntry>,
    priorities: BTreeMap<String, i64>,
}

impl fmt::Debug for ContextBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextBuilder")
            .field("name", &self.name)
            .field("transports", &self.transports)
            .field("channels", &self.channels)
            .field("priorities", &self.priorities)
            .finish()
    }
}

/// The default backends of this build, with PyTorch's priorities.
fn defaults() -> (Vec<TransportEntry>, Vec<ChannelEntry>) {
    #[allow(unused_mut)]
    let mut transports: Vec<TransportEntry> = Vec::new();
    #[allow(unused_mut)]
    let mut channels: Vec<ChannelEntry> = Vec::new();
    #[cfg(feature = "shm")]
    transports.push(TransportEntry {
        name: "shm".into(),
        priority: 200,
        transport: Arc::new(tp_transport::shm::ShmTransport::default()),
    });
    #[cfg(feature = "ibv")]
    transports.push(TransportEntry {
        name: "ibv".into(),
        priority: 100,
        transport: Arc::new(tp_transport::ibv::IbvTransport::default()),
    });
    #[cfg(feature = "tcp")]
    transports.push(TransportEntry {
        name: "tcp".into(),
        priority: 0,
        transport: Arc::new(tp_transport::tcp::TcpTransport::new()),
    });
    #[cfg(feature = "xth")]
    channels.push(ChannelEntry {
        name: "xth".into(),
        priority: 1300,
        channel: Arc::new(tp_channel::xth::XthContext::new()),
    });
    #[cfg(feature = "cma")]
    channels.push(ChannelEntry {
        name: "cma".into(),
        priority: 1200,
        channel: Arc::new(tp_channel::cma::CmaContext::default()),
    });
    #[cfg(feature = "mpt")]
    channels.push(ChannelEntry {
        name: "mpt".into(),
        priority: 1100,
        channel: Arc::new(tp_channel::mpt::MptContext::default()),
    });
    #[cfg(feature = "basic")]
    channels.push(ChannelEntry {
        name: "basic".into(),
        priority: 1000,
        channel: Arc::new(tp_channel::basic::BasicContext::new()),
    });
    #[cfg(feature = "cuda")]
    {
        channels.push(ChannelEntry {
            name: "cuda_xth".into(),
            priority: 400,
            channel: Arc::new(tp_cuda::xth::CudaXthContext::new()),
        });
        channels.push(ChannelEntry {
            name: "cuda_ipc".into(),
            priority: 300,
            channel: Arc::new(tp_cuda::ipc::CudaIpcContext::default()),
        });
        channels.push(ChannelEntry {
            name: "cuda_gdr".into(),
            priority: 200,
            channel: Arc::new(tp_cuda::gdr::CudaGdrContext::new()),
        });
        channels.push(ChannelEntry {
            name: "cuda_basic".into(),
            priority: 0,
            channel: Arc::new(tp_cuda::basic::CudaBasicContext::new(
                Arc::new(tp_channel::basic::BasicContext::new()),
                tp_cuda::basic::CudaBasicConfig::default(),
            )),
        });
    }
    (transports, channels)
}

impl ContextBuilder {
    /// Starts from every backend this build has, at the default priorities.
    pub fn new(name: impl Into<String>) -> Self {
        let (transports, channels) = defaults();
        Self {
            name: name.into(),
            transports,
            channels,
            priorities: BTreeMap::new(),
        }
    }

    /// Starts from no backends at all.
    pub fn empty(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            transports: Vec::new(),
            channels: Vec::new(),
            priorities: BTreeMap::new(),
        }
    }

    /// Registers (or replaces, by name) a transport.
    #[must_use]
    pub fn transport(mut self, priority: i64, transport: Arc<dyn Transport>) -> Self {
        let name = transport.name().to_string();
        self.transports.retain(|t| t.name != name);
        self.transports.push(TransportEntry {
            name,
            priority,
            transport,
        });
        self
    }

    /// Registers (or replaces, by name) a channel.
    #[must_use]
    pub fn channel(mut self, priority: i64, channel: Arc<dyn ChannelContext>) -> Self {
        let name = channel.name().to_string();
        self.channels.retain(|c| c.name != name);
        self.channels.push(ChannelEntry {
            name,
            priority,
            channel,
        });
        self
    }

    /// Overrides the priority of the backend `name` (checked by [`ContextBuilder::build`]).
    #[must_use]
    pub fn priority(mut self, name: impl Into<String>, priority: i64) -> Self {
        self.priorities.insert(name.into(), priority);
        self
    }

    /// The names of the transports registered so far.
    pub fn transport_names(&self) -> Vec<String> {
        self.transports.iter().map(|t| t.name.clone()).collect()
    }

    /// The names of the channels registered so far.
    pub fn channel_names(&self) -> Vec<String> {
        self.channels.iter().map(|c| c.name.clone()).collect()
    }

    /// Keeps only the transports `names` lists, ranked in that order (the first wins
    /// every handshake). Names not registered are ignored here; check them first with
    /// [`transport_names`](Self::transport_names).
    #[must_use]
    pub fn use_transports(mut self, names: &[String]) -> Self {
        self.transports.retain(|t| names.contains(&t.name));
        for t in &mut self.transports {
            t.priority = rank_by_order(names, &t.name);
        }
        self
    }

    /// Keeps only the channels `names` lists, ranked in that order (first = preferred).
    #[must_use]
    pub fn use_channels(mut self, names: &[String]) -> Self {
        self.channels.retain(|c| names.contains(&c.name));
        for c in &mut self.channels {
            c.priority = rank_by_order(names, &c.name);
        }
        self
    }

    fn build_unchecked(self) -> Context {
        Context {
            name: self.name,
            transports: self.transports,
            channels: self.channels,
            skipped: Vec::new(),
            config: PipeConfig::default(),
            epoch: std::time::Instant::now(),
            runtime: std::sync::OnceLock::new(),
        }
    }

    /// Builds the context: applies the priorities, drops backends that are not viable
    /// (logging why), and ranks the rest.
    ///
    /// # Errors
    /// [`ContextError::UnknownBackend`] for a priority naming no registered backend.
    pub fn build(self) -> Result<Context, ContextError> {
        let mut transports = self.transports;
        let mut channels = self.channels;
        for (name, priority) in &self.priorities {
            let t = transports.iter_mut().find(|t| &t.name == name);
            let c = channels.iter_mut().find(|c| &c.name == name);
            match (t, c) {
                (Some(t), _) => t.priority = *priority,
                (None, Some(c)) => c.priority = *priority,
                (None, None) => {
                    let known = transports
                        .iter()
                        .map(|t| t.name.clone())
                        .chain(channels.iter().map(|c| c.name.clone()))
                        .collect();
                    return Err(ContextError::UnknownBackend {
                        name: name.clone(),
                        known,
                    });
                }
            }
        }
        let mut skipped = Vec::new();
        transports.retain(|t| match t.transport.viability() {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(transport = t.name, reason = %e, "transport skipped: not viable");
                skipped.push((t.name.clone(), e.to_string()));
                false
            }
        });
        channels.retain(|c| match c.channel.viability() {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(channel = c.name, reason = %e, "channel skipped: not viable");
                skipped.push((c.name.clone(), e.to_string()));
                false
            }
        });
        // Highest priority first; names break ties so the order is deterministic.
        transports.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        channels.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        Ok(Context {
            name: self.name,
            transports,
            channels,
            skipped,
            config: PipeConfig::default(),
            epoch: std::time::Instant::now(),
            runtime: std::sync::OnceLock::new(),
        })
    }
}

/// A priority from a position in a user's list: the first name gets the highest.
fn rank_by_order(names: &[String], name: &str) -> i64 {
    let pos = names.iter().position(|n| n == name).unwrap_or(names.len());
    i64::try_from(names.len() - pos).unwrap_or(i64::MAX)
}

/// The registries of one tp instance: viable transports and channels, best first; and
/// the runtime its pipes do their I/O on.
pub struct Context {
    name: String,
    transports: Vec<TransportEntry>,
    channels: Vec<ChannelEntry>,
    skipped: Vec<(String, String)>,
    config: PipeConfig,
    epoch: std::time::Instant,
    runtime: std::sync::OnceLock<crate::runtime::Runtime>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.name)
            .field("transports", &self.transports)
            .field("channels", &self.channels)
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl Context {
    /// A context with every backend of this build at the default priorities.
    pub fn new(name: impl Into<String>) -> Self {
        // Without priority overrides, building cannot fail.
        let name = name.into();
        ContextBuilder::new(name.clone())
            .build()
            .unwrap_or_else(|_| ContextBuilder::empty(name).build_unchecked())
    }

    /// Starts building a context.
    pub fn builder(name: impl Into<String>) -> ContextBuilder {
        ContextBuilder::new(name)
    }

    /// This context's name (what peers see as the remote name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Viable transports, best first.
    pub fn transports(&self) -> &[TransportEntry] {
        &self.transports
    }

    /// Viable channels, best first.
    pub fn channels(&self) -> &[ChannelEntry] {
        &self.channels
    }

    /// Backends left out as not viable, with the reason.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }

    /// The settings every pipe of this context uses.
    pub fn pipe_config(&self) -> PipeConfig {
        self.config
    }

    /// Time as the pipes' state machines see it.
    pub(crate) fn now(&self) -> tp_wire::Instant {
        tp_wire::Instant::from_nanos(
            u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX),
        )
    }

    /// The runtime pipes do their I/O on (its thread starts on first use).
    pub(crate) fn pool(&self) -> &crate::runtime::Runtime {
        self.runtime.get_or_init(|| {
            crate::runtime::Runtime::start(&format!("tp-{}", self.name))
                .unwrap_or_else(|e| panic!("cannot start tp's I/O thread: {e}"))
        })
    }

    /// Runs `task` on this context's I/O thread, the one every pipe of the context does
    /// its I/O on, and returns a handle that resolves to its output.
    ///
    /// Code that drives pipes in a loop (an echo server, a benchmark, an RPC
    /// dispatcher) runs fastest here: a pipe completes an operation on this thread, so
    /// the task that awaits it runs at once instead of waking a thread elsewhere —
    /// each such hop costs a thread wake-up (3–45 µs on a VM). The task must not block:
    /// while it runs, no pipe of the context moves. A panic in it is caught and returned
    /// by the handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> crate::runtime::Spawned<T> {
        self.pool().spawn(task)
    }

    /// Opens a pipe to the listener at `url` (`tcp://host:port`, `shm://name`). The pipe
    /// is returned at once; its operations queue until the handshake is done.
    ///
    /// # Errors
    /// A malformed URL or one naming no transport of this context.
    pub fn connect(self: &Arc<Self>, url: &str) -> Result<crate::Pipe, ContextError> {
        let (transport, address) = self.resolve_url(url)?;
        let connect = transport.connect(address);
        let mut pipe = tp_wire::pipe::Pipe::connect(
            self.config,
            self.offer(&BTreeMap::new()),
            transport.name(),
            url.to_string(),
            self.now(),
        );
        pipe.set_compatibility(self.compatibility());
        let shared = crate::pipe::Shared::new(pipe, self.clone(), None);
        shared.connect_primary(connect);
        Ok(crate::Pipe::from_shared(shared))
    }

    /// Listens on every URL (`tcp://127.0.0.1:0`, `shm://`; port 0 and an empty shm
    /// name pick one, see [`Listener::urls`](crate::Listener::urls)).
    ///
    /// # Errors
    /// A malformed URL, an unknown scheme, or the transport's error as text.
    pub fn listen(self: &Arc<Self>, urls: &[&str]) -> Result<crate::Listener, ListenError> {
        let mut bound = Vec::new();
        for url in urls {
            let (transport, address) = self.resolve_url(url).map_err(ListenError::Url)?;
            let l = transport.listen(address).map_err(ListenError::Transport)?;
            bound.push((transport.name().to_string(), l));
        }
        Ok(crate::Listener::start(self, bound))
    }

    /// Closes the context: every transport and channel context it holds closes its
    /// listeners, connections and channels, so every pipe and listener of this context
    /// fails its pending operations and accepts nothing more. Idempotent.
    pub fn close(&self) {
        for t in &self.transports {
            t.transport.close();
        }
        for c in &self.channels {
            c.channel.close();
        }
    }

    /// Closes the context (see [`close`](Self::close)) and resolves once every task on
    /// its I/O thread has finished: every pipe and listener has failed its pending
    /// operations and let go of its connections. Tasks given to
    /// [`spawn`](Self::spawn) count too, so one that waits on something else forever
    /// keeps `join` waiting; bound it with a timeout where that can happen.
    /// Idempotent.
    pub fn join(&self) -> impl Future<Output = ()> + Send + 'static {
        self.close();
        let idle = self.runtime.get().map(crate::runtime::Runtime::idle);
        async move {
            if let Some(idle) = idle {
                let _ = idle.await;
            }
        }
    }

    /// The transport registered under `name`.
    pub fn transport(&self, name: &str) -> Option<&Arc<dyn Transport>> {
        self.transports
            .iter()
            .find(|t| t.name == name)
            .map(|t| &t.transport)
    }

    /// The channel registered under `name`.
    pub fn channel(&self, name: &str) -> Option<&Arc<dyn ChannelContext>> {
        self.channels
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.channel)
    }

    /// Splits `scheme://address` and checks that the scheme is one of this context's
    /// transports.
    ///
    /// # Errors
    /// [`ContextError::MalformedUrl`] or [`ContextError::UnknownScheme`].
    pub fn resolve_url<'u>(
        &self,
        url: &'u str,
    ) -> Result<(&Arc<dyn Transport>, &'u str), ContextError> {
        let (scheme, address) = parse_url(url)?;
        let t = self
            .transport(scheme)
            .ok_or_else(|| ContextError::UnknownScheme {
                url: url.to_string(),
                known: self.transports.iter().map(|t| t.name.clone()).collect(),
            })?;
        Ok((t, address))
    }

    /// The rule a pipe's handshake judges channel descriptors by: each channel's own
    /// [`ChannelContext::can_communicate_with_remote`].
    pub(crate) fn compatibility(&self) -> Arc<tp_wire::pipe::Compatible> {
        let channels: Vec<(String, Arc<dyn ChannelContext>)> = self
            .channels
            .iter()
            .map(|c| (c.name.clone(), c.channel.clone()))
            .collect();
        Arc::new(move |name: &str, server: &[u8], client: &[u8]| {
            channels
                .iter()
                .find(|(n, _)| n == name)
                .is_some_and(|(_, c)| c.can_communicate_with_remote(server, client))
        })
    }

    /// What this context offers a pipe's handshake. `addresses` are the listening
    /// addresses by transport name (a server offers only transports it listens on).
    pub fn offer(&self, addresses: &BTreeMap<String, String>) -> LocalOffer {
        LocalOffer {
            context_name: self.name.clone(),
            transports: self
                .transports
                .iter()
                .map(|t| LocalTransport {
                    name: t.name.clone(),
                    priority: t.priority,
                    domain_descriptor: t.transport.domain_descriptor().to_vec(),
                    address: addresses.get(&t.name).cloned(),
                })
                .collect(),
            channels: self
                .channels
                .iter()
                .map(|c| LocalChannel {
                    name: c.name.clone(),
                    priority: c.priority,
                    connections: u32::try_from(c.channel.connections_needed()).unwrap_or(u32::MAX),
                    devices: c
                        .channel
                        .device_descriptors()
                        .into_iter()
                        .map(|(device, descriptor)| OwnedDeviceDescriptor { device, descriptor })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Why [`Context::listen`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ListenError {
    /// A bad URL.
    Url(ContextError),
    /// The transport could not listen.
    Transport(tp_transport::TransportError),
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url(e) => e.fmt(f),
            Self::Transport(e) => write!(f, "cannot listen: {e}"),
        }
    }
}

impl std::error::Error for ListenError {}

/// A random 64-bit number (registration id seeds), without a dependency.
pub(crate) fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now())
}

/// Splits `scheme://address`.
///
/// # Errors
/// [`ContextError::MalformedUrl`] when there is no `://`, the scheme is empty or not
/// made of lowercase letters, digits, `+`, `-` or `.`.
pub fn parse_url(url: &str) -> Result<(&str, &str), ContextError> {
    let malformed = |reason| ContextError::MalformedUrl {
        url: url.to_string(),
        reason,
    };
    let (scheme, address) = url
        .split_once("://")
        .ok_or_else(|| malformed("expected scheme://address"))?;
    if scheme.is_empty() {
        return Err(malformed("empty scheme"));
    }
    if !scheme
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
    {
        return Err(malformed(
            "the scheme has characters other than a-z 0-9 + - .",
        ));
    }
    Ok((scheme, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_and_bad_ones_are_named() {
        assert_eq!(parse_url("tcp://127.0.0.1:80"), Ok(("tcp", "127.0.0.1:80")));
        assert_eq!(parse_url("shm://"), Ok(("shm", "")));
        assert_eq!(parse_url("tcp://[::1]:0"), Ok(("tcp", "[::1]:0")));
        for bad in ["127.0.0.1:80", "://x", "TCP://x", "t p://x", ""] {
            let e = parse_url(bad).unwrap_err();
            assert!(matches!(e, ContextError::MalformedUrl { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    #[cfg(all(
        feature = "tcp",
        feature = "shm",
        feature = "xth",
        feature = "cma",
        feature = "mpt",
        feature = "basic"
    ))]
    fn defaults_rank_by_pytorchs_priorities() {
        let ctx = Context::new("w0");
        let t: Vec<_> = ctx
            .transports()
            .iter()
            .map(|t| (t.name.as_str(), t.priority))
            .collect();
        #[allow(unused_mut)]
        let mut want_t = vec![("shm", 200), ("tcp", 0)];
        #[cfg(feature = "ibv")]
        if tp_transport::ibv::IbvTransport::default().is_viable() {
            want_t.insert(1, ("ibv", 100));
        }
        assert_eq!(t, want_t);
        let c: Vec<_> = ctx
            .channels()
            .iter()
            .map(|c| (c.name.as_str(), c.priority))
            .collect();
        // cma is probed for real; on this kind of machine it is viable (platform.md).
        let expect_cma = tp_channel::cma::CmaContext::default().is_viable();
        let mut want = vec![("xth", 1300)];
        if expect_cma {
            want.push(("cma", 1200));
        }
        want.extend([("mpt", 1100), ("basic", 1000)]);
        assert_eq!(c, want);
        assert_eq!(ctx.name(), "w0");
    }

    #[test]
    fn priorities_can_be_overridden_and_unknown_names_are_errors() {
        let ctx = Context::builder("w")
            .priority("tcp", 500)
            .priority("basic", 2000)
            .build()
            .unwrap();
        assert_eq!(ctx.transports()[0].name, "tcp");
        assert_eq!(ctx.channels()[0].name, "basic");
        let e = Context::builder("w")
            .priority("carrier-pigeon", 1)
            .build()
            .unwrap_err();
        match &e {
            ContextError::UnknownBackend { name, known } => {
                assert_eq!(name, "carrier-pigeon");
                assert!(known.contains(&"tcp".to_string()));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("carrier-pigeon"));
    }

    #[test]
    #[cfg(feature = "mpt")]
    fn a_backend_that_is_not_viable_is_skipped_with_its_reason() {
        let bad = tp_channel::mpt::MptContext::new(tp_channel::mpt::MptConfig {
            lanes: 0,
            ..tp_channel::mpt::MptConfig::default()
        });
        let ctx = Context::builder("w")
            .channel(1100, Arc::new(bad))
            .build()
            .unwrap();
        assert!(ctx.channel("mpt").is_none());
        let (_, why) = ctx.skipped().iter().find(|(n, _)| n == "mpt").unwrap();
        assert!(why.contains("0 lanes"), "{why}");
    }

    #[test]
    fn urls_resolve_to_this_contexts_transports() {
        let ctx = Context::new("w");
        let (t, addr) = ctx.resolve_url("tcp://127.0.0.1:0").unwrap();
        assert_eq!(t.name(), "tcp");
        assert_eq!(addr, "127.0.0.1:0");
        let e = ctx.resolve_url("ibv://10.0.0.1:1").unwrap_err();
        assert!(matches!(e, ContextError::UnknownScheme { .. }), "{e}");
        assert!(e.to_string().contains("shm, "), "{e}");
        assert!(e.to_string().ends_with("tcp)"), "{e}");
    }

    #[test]
    fn the_offer_carries_descriptors_and_listening_addresses() {
        let ctx = Context::new("w");
        let mut addrs = BTreeMap::new();
        addrs.insert("tcp".to_string(), "127.0.0.1:5".to_string());
        let offer = ctx.offer(&addrs);
        assert_eq!(offer.context_name, "w");
        let tcp = offer.transports.iter().find(|t| t.name == "tcp").unwrap();
        assert_eq!(tcp.address.as_deref(), Some("127.0.0.1:5"));
        assert_eq!(tcp.domain_descriptor, b"tcp:*");
        let shm = offer.transports.iter().find(|t| t.name == "shm").unwrap();
        assert_eq!(shm.address, None);
        let basic = offer.channels.iter().find(|c| c.name == "basic").unwrap();
        assert_eq!(basic.connections, 1);
        assert_eq!(basic.devices[0].descriptor, b"any");
    }
}
