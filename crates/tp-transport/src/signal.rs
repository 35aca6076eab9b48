//! A one-way "closed" signal that futures can wait on.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

/// Fired once; wakes every waiter.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    fired: AtomicBool,
    waiters: Mutex<Vec<Waker>>,
}

impl Signal {
    pub(crate) fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        let waiters =
            std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
        for w in waiters {
            w.wake();
        }
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Ready once fired.
    pub(crate) fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_fired() {
            return Poll::Ready(());
        }
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        // Re-check under the lock: `fire` takes the list after setting the flag.
        if self.is_fired() {
            return Poll::Ready(());
        }
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Runs `fut` unless the signal fires first, in which case it is dropped and the
    /// result is [`TransportError::Closed`](crate::TransportError::Closed).
    pub(crate) async fn or_closed<T>(
        &self,
        fut: impl Future<Output = T>,
    ) -> Result<T, crate::TransportError> {
        let mut fut = pin!(fut);
        std::future::poll_fn(|cx| {
            if self.poll_fired(cx).is_ready() {
                return Poll::Ready(Err(crate::TransportError::Closed));
            }
            fut.as_mut().poll(cx).map(Ok)
        })
        .await
    }
}
