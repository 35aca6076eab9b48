//! A connection task's queue of actions.
//!
//! The pipe's core queues reads and writes for a connection's task to do in order. An
//! unbounded channel allocates a node per action; over shm every message waits for
//! its descriptor this way, so that was an allocation per message. This queue is a
//! list behind a lock that keeps its room, and the task's waker: sending allocates
//! nothing once the list has grown to the most actions ever queued at once.
//!
//! It closes as a channel does: once the [`Sender`] is dropped (the core let go of the
//! connection) the task receives what is queued and then `None`; once the
//! [`Receiver`] is dropped (the task ended) a send hands its action back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

struct State<A> {
    queue: VecDeque<A>,
    /// The task waiting for an action, if it is.
    waker: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

type Shared<A> = Arc<Mutex<State<A>>>;

fn lock<A>(s: &Shared<A>) -> MutexGuard<'_, State<A>> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A new queue's two ends.
pub(super) fn queue<A>() -> (Sender<A>, Receiver<A>) {
    let s = Arc::new(Mutex::new(State {
        queue: VecDeque::new(),
        waker: None,
        sender_gone: false,
        receiver_gone: false,
    }));
    (Sender(s.clone()), Receiver(s))
}

/// The core's end.
pub(super) struct Sender<A>(Shared<A>);

impl<A> Sender<A> {
    /// Queues `act` and wakes the task; hands `act` back if the task has ended.
    pub(super) fn send(&self, act: A) -> Result<(), A> {
        let waker = {
            let mut s = lock(&self.0);
            if s.receiver_gone {
                return Err(act);
            }
            s.queue.push_back(act);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl<A> Drop for Sender<A> {
    fn drop(&mut self) {
        let waker = {
            let mut s = lock(&self.0);
            s.sender_gone = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The task's end.
pub(super) struct Receiver<A>(Shared<A>);

impl<A> Receiver<A> {
    /// The next action; `None` once the sender is gone and every action was received.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<A>> {
        let mut s = lock(&self.0);
        if let Some(act) = s.queue.pop_front() {
            return Poll::Ready(Some(act));
        }
        if s.sender_gone {
            return Poll::Ready(None);
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// [`Receiver::poll_next`], as a future.
    pub(super) async fn next(&mut self) -> Option<A> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

impl<A> Drop for Receiver<A> {
    fn drop(&mut self) {
        // Actions still queued are dropped here, outside the lock: one may own a
        // future or a sender whose drop does more.
        let left = {
            let mut s = lock(&self.0);
            s.receiver_gone = true;
            s.waker = None;
            std::mem::take(&mut s.queue)
        };
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn actions_arrive_in_order_and_wake_the_waiting_task() {
        let (tx, mut rx) = queue();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_next(&mut cx).is_pending());
        tx.send(1).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the send woke the task");
        tx.send(2).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "no waiter left to wake");
        assert_eq!(rx.poll_next(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(rx.poll_next(&mut cx), Poll::Ready(Some(2)));
        assert!(rx.poll_next(&mut cx).is_pending());
        // The sender's drop wakes the task, which gets what is left, then the end.
        tx.send(3).unwrap();
        drop(tx);
        assert_eq!(rx.poll_next(&mut cx), Poll::Ready(Some(3)));
        assert_eq!(rx.poll_next(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_dropped_sender_ends_a_waiting_task() {
        let (tx, mut rx) = queue::<u8>();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        assert!(rx.poll_next(&mut Context::from_waker(&waker)).is_pending());
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            rx.poll_next(&mut Context::from_waker(&waker)),
            Poll::Ready(None)
        );
    }

    #[test]
    fn a_send_to_an_ended_task_hands_the_action_back() {
        let (tx, rx) = queue();
        tx.send(String::from("queued")).unwrap();
        drop(rx);
        assert_eq!(tx.send(String::from("late")), Err(String::from("late")));
    }

    #[test]
    fn a_task_on_another_thread_receives_everything() {
        let (tx, mut rx) = queue();
        let task = std::thread::spawn(move || {
            futures::executor::block_on(async move {
                let mut got = Vec::new();
                while let Some(n) = rx.next().await {
                    got.push(n);
                }
                got
            })
        });
        for n in 0..10_000u32 {
            tx.send(n).unwrap();
        }
        drop(tx);
        assert!(task.join().unwrap().into_iter().eq(0..10_000));
    }
}
