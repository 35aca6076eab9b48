//! What a channel context made, so that closing the context closes it all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, Weak};

/// Something a context closes when it closes.
pub trait Close: Send + Sync {
    /// Closes it. Idempotent.
    fn close(&self);
}

/// A context's closed flag and weak references to its channels.
#[derive(Default)]
pub struct Children {
    closed: AtomicBool,
    list: Mutex<Vec<Weak<dyn Close>>>,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Children")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Children {
    /// Whether the context closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Tracks `child`; closes it at once if the context already closed.
    pub fn adopt(&self, child: Weak<dyn Close>) {
        let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_closed() {
            drop(list);
            if let Some(c) = child.upgrade() {
                c.close();
            }
            return;
        }
        list.retain(|c| c.strong_count() > 0);
        list.push(child);
    }

    /// Closes the context and everything it made. Idempotent.
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::Release);
        let list = std::mem::take(&mut *self.list.lock().unwrap_or_else(PoisonError::into_inner));
        for c in list.iter().filter_map(Weak::upgrade) {
            c.close();
        }
    }
}
