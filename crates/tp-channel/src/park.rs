//! A process-wide parking lot for buffers that a receiver in the same process reads
//! directly (xth, and tp-cuda's cuda_xth): the sender parks its buffer under a fresh
//! token and sends only the token, so a confused or hostile peer can name only a buffer
//! that is parked right now — never arbitrary memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use crate::{ChannelError, SendBuf};

/// Read-locked by whoever reads the bytes (a receiver, and xth's helping sender, at
/// once); write-locked only to take the buffer back.
type Parked = Arc<RwLock<Option<Box<dyn SendBuf>>>>;

/// Buffers parked by senders, by token.
fn registry() -> &'static Mutex<HashMap<u64, Parked>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u64, Parked>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// A parked buffer. Dropping the ticket unparks the buffer (and drops it), so an
/// abandoned send leaks nothing; [`Ticket::take_back`] unparks and returns it.
pub struct Ticket {
    token: u64,
    parked: Parked,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("token", &self.token)
            .finish()
    }
}

/// Parks `buf`; the ticket's [`Ticket::token`] names it to [`with_parked`].
pub fn park(buf: Box<dyn SendBuf>) -> Ticket {
    let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
    let parked: Parked = Arc::new(RwLock::new(Some(buf)));
    registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(token, parked.clone());
    Ticket { token, parked }
}

impl Ticket {
    /// The token a receiver names the buffer by.
    pub const fn token(&self) -> u64 {
        self.token
    }

    /// Runs `f` on the parked bytes (the sender's own view; receivers may read them at
    /// the same time).
    pub fn with_bytes<R>(&self, f: impl FnOnce(&dyn SendBuf) -> R) -> Option<R> {
        let guard = self.parked.read().unwrap_or_else(PoisonError::into_inner);
        guard.as_deref().map(f)
    }

    /// Unparks the buffer and hands it back.
    pub fn take_back(self) -> Box<dyn SendBuf> {
        let buf = self
            .parked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(self);
        // A parked buffer is only ever taken here, once.
        buf.unwrap_or_else(|| Box::new(Vec::new()))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        registry()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.token);
    }
}

/// Runs `f` on the buffer parked under `token`; the buffer stays parked (its sender
/// cannot take it back) until `f` returns.
///
/// # Errors
/// [`ChannelError::Protocol`] when nothing is parked under `token`.
pub fn with_parked<R>(token: u64, f: impl FnOnce(&dyn SendBuf) -> R) -> Result<R, ChannelError> {
    let parked = registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&token)
        .cloned()
        .ok_or_else(|| ChannelError::protocol(format!("no parked buffer {token}")))?;
    let guard = parked.read().unwrap_or_else(PoisonError::into_inner);
    let buf = guard
        .as_deref()
        .ok_or_else(|| ChannelError::protocol(format!("buffer {token} was taken back")))?;
    Ok(f(buf))
}
