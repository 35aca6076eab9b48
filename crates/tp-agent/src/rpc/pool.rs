//! The worker pool: a fixed set of threads that run request handlers, never on an I/O
//! thread.
//!
//! It is a small executor: each request is a task (a future); a thread polls it, and a
//! task that waits (an async handler awaiting its own RPC) frees the thread until its
//! waker queues it again. So `num_idle_threads` means what it says: threads with
//! nothing to poll.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

type Queue = (VecDeque<Arc<Task>>, bool);

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    idle: AtomicUsize,
    size: usize,
}

struct Task {
    future: Mutex<Option<BoxFuture<'static, ()>>>,
    queued: AtomicBool,
    pool: Weak<Shared>,
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel)
            && let Some(pool) = self.pool.upgrade()
        {
            pool.push(self.clone());
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, task: Arc<Task>) {
        let mut q = self.lock();
        if q.1 {
            return; // closed: the task is dropped, and with it what it held
        }
        q.0.push_back(task);
        drop(q);
        self.ready.notify_one();
    }
}

thread_local! {
    static ON_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is one of a pool's workers.
pub(crate) fn on_pool_thread() -> bool {
    ON_POOL.with(std::cell::Cell::get)
}

/// A fixed pool of worker threads running futures.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Starts `size` threads named `<name>-worker-<i>`.
    pub(crate) fn start(name: &str, size: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
            idle: AtomicUsize::new(0),
            size,
        });
        let mut threads = Vec::with_capacity(size);
        for i in 0..size {
            let s = shared.clone();
            let started = std::thread::Builder::new()
                .name(format!("{name}-worker-{i}"))
                .spawn(move || work(&s));
            match started {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Let the threads already started end.
                    shared.lock().1 = true;
                    shared.ready.notify_all();
                    return Err(e);
                }
            }
        }
        Ok(Self {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// Runs `task` on a worker thread. After [`close`](Self::close) it is dropped.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let task = Arc::new(Task {
            future: Mutex::new(Some(Box::pin(task))),
            queued: AtomicBool::new(true),
            pool: Arc::downgrade(&self.shared),
        });
        self.shared.push(task);
    }

    /// The number of threads.
    pub(crate) fn size(&self) -> usize {
        self.shared.size
    }

    /// Threads waiting for work.
    pub(crate) fn idle(&self) -> usize {
        self.shared.idle.load(Ordering::Relaxed)
    }

    /// Lets the threads finish what is queued, then stop; waits for them up to `limit`
    /// (a handler that never returns is left behind, with a warning). Idempotent.
    pub(crate) fn close(&self, limit: Duration) {
        self.shared.lock().1 = true;
        self.shared.ready.notify_all();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let deadline = Instant::now() + limit;
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() == me {
                continue; // closing from a handler: this thread ends when it returns
            }
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(
                    thread = t.thread().name().unwrap_or("?"),
                    "an RPC handler is still running at shutdown; leaving its thread behind"
                );
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().1 = true;
        self.shared.ready.notify_all();
    }
}

fn work(shared: &Arc<Shared>) {
    ON_POOL.with(|p| p.set(true));
    loop {
        let task = {
            let mut q = shared.lock();
            loop {
                if let Some(t) = q.0.pop_front() {
                    break t;
                }
                if q.1 {
                    return;
                }
                shared.idle.fetch_add(1, Ordering::Relaxed);
                q = shared.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
                shared.idle.fetch_sub(1, Ordering::Relaxed);
            }
        };
        task.queued.store(false, Ordering::Release);
        let waker = Waker::from(task.clone());
        let mut slot = task.future.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fut) = slot.as_mut() {
            let mut cx = Context::from_waker(&waker);
            // A panic ends the task, never the thread (handlers catch their own and
            // answer with an error; this is the last line).
            let done = std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)))
                .unwrap_or(Poll::Ready(()));
            if done.is_ready() {
                *slot = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::oneshot;

    #[test]
    fn tasks_run_on_the_pool_and_waiting_tasks_free_their_thread() {
        let pool = Pool::start("t", 1).unwrap();
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        let (a_tx, a_rx) = std::sync::mpsc::channel();
        let (b_tx, b_rx) = std::sync::mpsc::channel();
        // A waits on the gate; with one thread, B can only run if A gave it up.
        pool.spawn(async move {
            gate_rx.await.unwrap();
            a_tx.send(on_pool_thread()).unwrap();
        });
        pool.spawn(async move {
            b_tx.send(()).unwrap();
            gate_tx.send(()).unwrap();
        });
        b_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(a_rx.recv_timeout(Duration::from_secs(10)).unwrap());
        assert!(!on_pool_thread());
        // Idle again.
        let t0 = Instant::now();
        while pool.idle() != 1 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!((pool.idle(), pool.size()), (1, 1));
        pool.close(Duration::from_secs(10));
    }

    #[test]
    fn a_panicking_task_does_not_kill_its_thread_and_close_drains_the_queue() {
        let pool = Pool::start("t", 1).unwrap();
        pool.spawn(async { panic!("on purpose") });
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            pool.spawn(async move { tx.send(i).unwrap() });
        }
        pool.close(Duration::from_secs(10));
        assert_eq!(rx.try_iter().count(), 100);
        // Closed: new work is dropped, not run.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        pool.spawn(async move { tx.send(()).unwrap() });
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    }
}
