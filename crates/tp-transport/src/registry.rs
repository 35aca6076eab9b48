//! What a transport context made, so that closing the context closes it all.

use std::sync::{Mutex, PoisonError, Weak};

use crate::signal::Signal;

/// Something a context closes when it closes.
pub(crate) trait Closable: Send + Sync {
    fn close(&self);
}

/// A context's closed flag and weak references to its listeners and connections.
#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) closed: Signal,
    children: Mutex<Vec<Weak<dyn Closable>>>,
}

impl Registry {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_fired()
    }

    /// Tracks `child`; closes it at once if the context already closed.
    pub(crate) fn adopt(&self, child: Weak<dyn Closable>) {
        if self.is_closed() {
            if let Some(c) = child.upgrade() {
                c.close();
            }
            return;
        }
        let mut children = self.children.lock().unwrap_or_else(PoisonError::into_inner);
        children.retain(|c| c.strong_count() > 0);
        children.push(child);
    }

    /// Closes the context and everything it made. Idempotent.
    pub(crate) fn close_all(&self) {
        self.closed.fire();
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(PoisonError::into_inner));
        for child in children.iter().filter_map(Weak::upgrade) {
            child.close();
        }
    }
}
