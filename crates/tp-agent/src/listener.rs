//! [`Listener`]: accepts pipes on one or more transports, and routes the extra
//! connections a pipe's handshake asks for to that pipe.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use futures::FutureExt;
use futures::StreamExt;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::lock::Mutex as AsyncMutex;
use tp_transport::{BoxConnection, BoxListener};
use tp_wire::packet::{Greeting, RegistrationId};
use tp_wire::pipe::{ConnId, Pipe as WirePipe, PipeError};

use crate::context::Context;
use crate::pipe::{OpError, Pipe, Shared};

/// Which pipe awaits which registration id.
#[derive(Default)]
pub(crate) struct Router {
    expecting: Mutex<HashMap<RegistrationId, Weak<Shared>>>,
}

impl Router {
    pub(crate) fn expect(&self, ids: &[RegistrationId], pipe: Weak<Shared>) {
        let mut map = self
            .expecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, p| p.strong_count() > 0);
        for id in ids {
            map.insert(*id, pipe.clone());
        }
    }

    fn take(&self, id: RegistrationId) -> Option<Arc<Shared>> {
        self.expecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
            .and_then(|p| p.upgrade())
    }
}

/// Accepts pipes.
pub struct Listener {
    urls: Vec<String>,
    incoming: AsyncMutex<mpsc::UnboundedReceiver<Pipe>>,
    listeners: Vec<BoxListener>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("urls", &self.urls)
            .finish()
    }
}

impl Listener {
    pub(crate) fn start(ctx: &Arc<Context>, bound: Vec<(String, BoxListener)>) -> Self {
        let router = Arc::new(Router::default());
        let addresses: BTreeMap<String, String> = bound
            .iter()
            .map(|(name, l)| (name.clone(), l.address().to_string()))
            .collect();
        let urls = bound.iter().map(|(_, l)| l.url()).collect();
        let (tx, rx) = mpsc::unbounded();
        let mut listeners = Vec::new();
        for (name, l) in bound {
            let l: Arc<BoxListener> = Arc::new(l);
            listeners.push(Box::new(SharedListener(l.clone())) as BoxListener);
            let pool = ctx.pool().clone();
            let ctx = ctx.clone();
            let router = router.clone();
            let tx = tx.clone();
            let addresses = addresses.clone();
            pool.spawn_ok(async move {
                while let Ok(conn) = l.accept().await {
                    let (ctx, router, tx, addresses, name) = (
                        ctx.clone(),
                        router.clone(),
                        tx.clone(),
                        addresses.clone(),
                        name.clone(),
                    );
                    let pool = ctx.pool().clone();
                    pool.spawn_ok(async move {
                        greet(ctx, router, tx, addresses, name, conn).await;
                    });
                }
            });
        }
        Self {
            urls,
            incoming: AsyncMutex::new(rx),
            listeners,
        }
    }

    /// The URLs this listener accepts on (ports and names resolved).
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The next pipe a peer opened.
    pub fn accept(&self) -> BoxFuture<'_, Result<Pipe, OpError>> {
        async move {
            self.incoming
                .lock()
                .await
                .next()
                .await
                .ok_or(OpError::Pipe(PipeError::Closed))
        }
        .boxed()
    }

    /// Stops accepting.
    pub fn close(&self) {
        for l in &self.listeners {
            l.close();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close();
    }
}

/// Lets the accept loop and the [`Listener`] share one transport listener.
struct SharedListener(Arc<BoxListener>);

impl std::fmt::Debug for SharedListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl tp_transport::Listener for SharedListener {
    fn address(&self) -> &str {
        self.0.address()
    }

    fn url(&self) -> String {
        self.0.url()
    }

    fn accept(&self) -> BoxFuture<'_, Result<BoxConnection, tp_transport::TransportError>> {
        self.0.accept()
    }

    fn close(&self) {
        self.0.close();
    }
}

/// Reads an accepted connection's first frame and acts on it: a new pipe, or an extra
/// connection of a pipe that asked for it. Anything else closes the connection only.
async fn greet(
    ctx: Arc<Context>,
    router: Arc<Router>,
    pipes: mpsc::UnboundedSender<Pipe>,
    addresses: BTreeMap<String, String>,
    transport: String,
    conn: BoxConnection,
) {
    let limits = ctx.pipe_config().limits;
    // A connection that never says who it is (a port scan, a stuck client) costs only
    // itself, and only until the handshake timeout.
    let patience = ctx
        .pipe_config()
        .handshake_timeout
        .unwrap_or(std::time::Duration::from_secs(30));
    let read = Box::pin(crate::pipe::read_first_frame(&conn, &limits));
    let futures::future::Either::Left((Ok(frame), _)) =
        futures::future::select(read, async_io::Timer::after(patience)).await
    else {
        tracing::debug!(transport, "listener: no greeting; connection dropped");
        return;
    };
    match Greeting::parse_frame(&frame, &limits) {
        Ok(Greeting::Spontaneous(hello)) => {
            let seed = crate::context::random_u64();
            let mut pipe = WirePipe::accept(
                ctx.pipe_config(),
                ctx.offer(&addresses),
                &transport,
                &hello,
                seed,
                ctx.now(),
            );
            pipe.set_compatibility(ctx.compatibility());
            let shared = Shared::new(pipe, ctx.clone(), Some(router));
            shared.attach(ConnId(0), conn);
            let _ = pipes.unbounded_send(Pipe::from_shared(shared));
        }
        Ok(Greeting::Requested(req)) => match router.take(req.registration_id) {
            Some(shared) => shared.attach_requested(req.registration_id, conn),
            None => tracing::warn!(id = %req.registration_id, "listener: unknown registration id"),
        },
        Err(e) => tracing::warn!(error = %e, "listener: bad first frame"),
    }
}
