//! Wake-ups futures can wait on: a one-way "closed" [`Signal`], and a repeatable
//! [`Notify`].

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// "Something changed": a generation counter with waiters. A waiter reads the
/// generation, checks its condition, and if it must wait, waits for the generation to
/// move on, so a change made between its check and its wait is never missed.
#[cfg_attr(not(feature = "ibv"), allow(dead_code))]
#[derive(Debug, Default)]
pub(crate) struct Notify {
    generation: AtomicU64,
    waiters: Mutex<Vec<Waker>>,
}

#[cfg_attr(not(feature = "ibv"), allow(dead_code))]
impl Notify {
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Moves the generation on and wakes every waiter.
    pub(crate) fn notify(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let waiters =
            std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
        for w in waiters {
            w.wake();
        }
    }

    /// Ready once the generation differs from `seen`.
    pub(crate) fn poll_changed(&self, seen: u64, cx: &mut Context<'_>) -> Poll<()> {
        if self.generation() != seen {
            return Poll::Ready(());
        }
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        // Re-check under the lock: `notify` bumps the counter before taking the list.
        if self.generation() != seen {
            return Poll::Ready(());
        }
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn notify_wakes_a_waiter_that_saw_the_old_generation() {
        let n = Arc::new(Notify::default());
        let seen = n.generation();
        let n2 = n.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            n2.notify();
        });
        futures::executor::block_on(std::future::poll_fn(|cx| n.poll_changed(seen, cx)));
        t.join().unwrap();
        assert_ne!(n.generation(), seen);
        // A change before the wait is seen at once.
        let seen = n.generation();
        n.notify();
        futures::executor::block_on(std::future::poll_fn(|cx| n.poll_changed(seen, cx)));
    }
}
