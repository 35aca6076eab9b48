//! One [`Listener`] for every backend: accepts complete in issue order, a close fails
//! pending and later accepts, and every accepted connection is adopted by its context.
//!
//! A backend supplies only an [`Acceptor`]: "wait for the next peer and set its
//! connection up".

use std::future::Future;
use std::sync::{Arc, Weak};

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::order::Order;
use crate::registry::{Closable, Registry};
use crate::signal::Signal;
use crate::{BoxConnection, BoxListener, Listener, TransportError};

/// A connection a backend accepted, and the handle its context closes it by.
pub(crate) struct Accepted {
    pub(crate) conn: BoxConnection,
    pub(crate) closable: Weak<dyn Closable>,
}

/// A backend's accept step.
pub(crate) trait Acceptor: Send + Sync + 'static {
    /// Waits for the next peer and sets its connection up. `Ok(None)` means a peer was
    /// refused (bad credentials, failed handshake): it costs only its own connection, and
    /// the listener goes on accepting.
    fn accept(&self) -> impl Future<Output = Result<Option<Accepted>, TransportError>> + Send + '_;
}

struct Core<A> {
    acceptor: A,
    scheme: &'static str,
    address: String,
    accepts: Order,
    closed: Signal,
    ctx: Weak<Registry>,
}

impl<A: Send + Sync> Closable for Core<A> {
    fn close(&self) {
        self.closed.fire();
    }
}

/// A listener over an [`Acceptor`].
struct Listening<A> {
    core: Arc<Core<A>>,
}

/// Makes a listener reporting `address` (the one actually bound), adopted by `ctx`.
pub(crate) fn listener<A: Acceptor>(
    ctx: &Arc<Registry>,
    scheme: &'static str,
    address: String,
    acceptor: A,
) -> BoxListener {
    let core = Arc::new(Core {
        acceptor,
        scheme,
        address,
        accepts: Order::default(),
        closed: Signal::default(),
        ctx: Arc::downgrade(ctx),
    });
    ctx.adopt(Arc::downgrade(&core) as Weak<dyn Closable>);
    Box::new(Listening { core })
}

impl<A> std::fmt::Debug for Listening<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field(
                "url",
                &format_args!("{}://{}", self.core.scheme, self.core.address),
            )
            .finish()
    }
}

impl<A> Drop for Listening<A> {
    fn drop(&mut self) {
        self.core.closed.fire();
    }
}

impl<A: Acceptor> Listener for Listening<A> {
    fn address(&self) -> &str {
        &self.core.address
    }

    fn url(&self) -> String {
        format!("{}://{}", self.core.scheme, self.core.address)
    }

    fn accept(&self) -> BoxFuture<'_, Result<BoxConnection, TransportError>> {
        let turn = self.core.accepts.turn();
        let core = &self.core;
        async move {
            turn.ready().await;
            loop {
                let Some(accepted) = core.closed.or_closed(core.acceptor.accept()).await?? else {
                    continue;
                };
                if let Some(ctx) = core.ctx.upgrade() {
                    ctx.adopt(accepted.closable);
                }
                return Ok(accepted.conn);
            }
        }
        .boxed()
    }

    fn close(&self) {
        self.core.closed.fire();
    }
}
