//! FIFO turns: operations complete in the order they were issued.
//!
//! Public because the channels of `tp-channel` keep the same promise with the same
//! tool.
//!
//! Each operation takes a [`Turn`] when it is *issued* (when the method is called, not
//! when its future is first polled), then waits until every earlier turn has finished.
//! A turn finishes when it is dropped — after completing, failing, or being cancelled —
//! so a dropped future never blocks the queue behind it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
struct State {
    next: u64,
    serving: u64,
    /// Turns dropped before they were served: skipped when reached.
    skipped: Vec<u64>,
    waiters: BTreeMap<u64, Waker>,
}

/// A queue of turns.
#[derive(Debug, Default, Clone)]
pub struct Order {
    state: Arc<Mutex<State>>,
}

impl Order {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent (plain counters).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` now if no operation holds or awaits a turn, with the queue held so no
    /// turn can be taken meanwhile, and returns what `f` returns; returns `false`
    /// without running it otherwise. For operations that finish without waiting: they
    /// need no turn of their own when nothing is ahead of them.
    pub fn try_now(&self, f: impl FnOnce() -> bool) -> bool {
        let s = self.lock();
        s.serving == s.next && f()
    }

    /// Takes the next turn.
    pub fn turn(&self) -> Turn {
        let mut s = self.lock();
        let ticket = s.next;
        s.next = s.next.wrapping_add(1);
        Turn {
            order: self.clone(),
            ticket,
        }
    }
}

/// One operation's place in an [`Order`].
#[derive(Debug)]
pub struct Turn {
    order: Order,
    ticket: u64,
}

impl Turn {
    /// Ready once every earlier turn has finished.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.order.lock();
        if s.serving == self.ticket {
            Poll::Ready(())
        } else {
            s.waiters.insert(self.ticket, cx.waker().clone());
            Poll::Pending
        }
    }

    /// Whether no later turn has been taken yet: nothing issued after this operation
    /// waits behind it (so far).
    pub fn is_last(&self) -> bool {
        self.order.lock().next == self.ticket.wrapping_add(1)
    }

    /// Waits for this turn.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut s = self.order.lock();
        s.waiters.remove(&self.ticket);
        if s.serving != self.ticket {
            s.skipped.push(self.ticket);
            return;
        }
        s.serving = s.serving.wrapping_add(1);
        while let Some(i) = s.skipped.iter().position(|&t| t == s.serving) {
            s.skipped.swap_remove(i);
            s.serving = s.serving.wrapping_add(1);
        }
        let next = s.serving;
        if let Some(w) = s.waiters.remove(&next) {
            drop(s);
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker;

    #[test]
    fn turns_are_served_in_issue_order_and_skip_dropped_ones() {
        let order = Order::default();
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let a = order.turn();
        let b = order.turn();
        let c = order.turn();
        assert!(a.poll_ready(&mut cx).is_ready());
        assert!(c.poll_ready(&mut cx).is_pending());
        drop(b); // cancelled before its turn
        assert!(c.poll_ready(&mut cx).is_pending());
        drop(a);
        assert!(c.poll_ready(&mut cx).is_ready());
        assert!(!order.try_now(|| true), "a turn is being served");
        drop(c);
        assert!(order.try_now(|| true), "nothing ahead");
        assert!(!order.try_now(|| false), "f's answer is passed on");
        let d = order.turn();
        assert!(!order.try_now(|| panic!("not run while a turn is out")));
        drop(d);
        assert!(order.try_now(|| true));
    }
}
