//! Splitting one large copy across threads that stay alive between copies.
//!
//! cma's pulls and xth's copies of large tensors go faster on several cores (one
//! thread's `process_vm_readv` or `memcpy` is far from the machine's bandwidth), but a
//! thread spawned per copy costs tens of microseconds — as much as a 1 MiB copy. So a
//! few helper threads live for the process: [`for_each`] cuts the work into pieces,
//! does them on the calling thread, and lets whichever helpers are awake take pieces
//! too. Pieces are *claimed*, not assigned: a helper that wakes late (a sleeping
//! thread's wake-up takes 3–45 µs on a VM) finds fewer pieces left or none, so the
//! copy is never slower than the caller doing it all alone, only faster when help
//! comes in time. A helper that finished a task looks for the next one for 50 µs
//! before it sleeps, so back-to-back copies find it awake.
//!
//! The work borrows the caller's buffers; the one `unsafe` below lets a helper call it
//! without a `'static` bound, and the close protocol ([`Task::state`]) is what makes
//! that sound: the caller returns only when no helper is inside the work and none can
//! enter any more.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long a helper keeps looking for work after a task before it sleeps.
const LINGER: Duration = Duration::from_micros(50);

/// The work of one task: piece `i` of `n`.
type Work = dyn Fn(usize) + Sync;

struct Task {
    /// The caller's work with its lifetime erased; called only by a thread that holds
    /// a place in `state`.
    work: &'static Work,
    /// How many pieces.
    n: usize,
    /// The next piece not yet claimed.
    next: AtomicUsize,
    /// Bit 0: closed (no helper may enter); the rest: twice the helpers inside.
    state: AtomicUsize,
    /// A helper's piece panicked; the caller re-raises.
    panicked: AtomicBool,
}

impl Task {
    /// Claims and does pieces until none is left.
    fn drain(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            (self.work)(i);
        }
    }

    /// A helper's share: enters unless the task is closed, drains, leaves.
    fn help(&self) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s & 1 == 1 || self.next.load(Ordering::Relaxed) >= self.n {
                return;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 2, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        if catch_unwind(AssertUnwindSafe(|| self.drain())).is_err() {
            self.panicked.store(true, Ordering::Relaxed);
            // No more pieces for anyone: the caller re-raises once all are out.
            self.next.store(usize::MAX / 2, Ordering::Relaxed);
        }
        self.state.fetch_sub(2, Ordering::AcqRel);
    }
}

/// Closes the task when the caller is done (or unwinds): waits until no helper is
/// inside the work, and none can enter.
struct CloseOnDrop<'a>(&'a Task);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        let task = self.0;
        task.next.store(usize::MAX / 2, Ordering::Relaxed);
        task.state.fetch_or(1, Ordering::AcqRel);
        // Those inside finish the one piece each of them holds.
        while task.state.load(Ordering::Acquire) > 1 {
            std::thread::yield_now();
        }
    }
}

struct Pool {
    queue: Mutex<VecDeque<Arc<Task>>>,
    /// Tasks in `queue`, read without the lock by lingering helpers.
    queued: AtomicUsize,
    wake: Condvar,
    /// Helper threads that started.
    helpers: AtomicUsize,
}

impl Pool {
    fn get() -> &'static Self {
        static POOL: OnceLock<&'static Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            // Asked once: `available_parallelism` reads cgroup files.
            let helpers = std::thread::available_parallelism()
                .map_or(1, std::num::NonZero::get)
                .min(4)
                - 1;
            let pool: &'static Self = Box::leak(Box::new(Self {
                queue: Mutex::default(),
                queued: AtomicUsize::new(0),
                wake: Condvar::new(),
                helpers: AtomicUsize::new(0),
            }));
            for i in 0..helpers {
                let spawned = std::thread::Builder::new()
                    .name(format!("tp-split-{i}"))
                    .spawn(move || pool.serve());
                match spawned {
                    Ok(_) => {
                        pool.helpers.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "tp-channel: cannot start a copy helper thread");
                    }
                }
            }
            pool
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Task>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn serve(&self) {
        let mut since = Instant::now();
        loop {
            if self.queued.load(Ordering::Acquire) == 0 && since.elapsed() < LINGER {
                std::hint::spin_loop();
                continue;
            }
            let task = {
                let mut q = self.lock();
                loop {
                    if let Some(t) = q.pop_front() {
                        self.queued.fetch_sub(1, Ordering::AcqRel);
                        break t;
                    }
                    q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            task.help();
            since = Instant::now();
        }
    }
}

/// Runs `work(i)` for every `i` in `0..n`, each exactly once, on this thread and on up
/// to `threads - 1` helpers; returns when all are done. A panic in any piece is
/// re-raised here, after every piece has stopped.
pub(crate) fn for_each(n: usize, threads: usize, work: &(dyn Fn(usize) + Sync)) {
    let pool = Pool::get();
    let helpers = pool
        .helpers
        .load(Ordering::Relaxed)
        .min(threads.saturating_sub(1))
        .min(n.saturating_sub(1));
    if helpers == 0 {
        (0..n).for_each(work);
        return;
    }
    // SAFETY: the reference is used only by threads inside the task (a place in
    // `state`, taken while bit 0 is clear), and `CloseOnDrop` below — which runs
    // before this function returns or unwinds past `work`'s lifetime — sets bit 0
    // and waits until no place is held. So no call of `work` outlives the borrow.
    let erased: &'static Work = unsafe {
        std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync + 'static)>(
            work,
        )
    };
    let task = Arc::new(Task {
        work: erased,
        n,
        next: AtomicUsize::new(0),
        state: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    });
    {
        let mut q = pool.lock();
        // Tasks already closed are no help to anyone: a queue with no helper left to
        // take from it (after a fork, say) stays bounded by the tasks in progress.
        let before = q.len();
        q.retain(|t| t.state.load(Ordering::Acquire) & 1 == 0);
        pool.queued.fetch_sub(before - q.len(), Ordering::AcqRel);
        for _ in 0..helpers {
            q.push_back(task.clone());
        }
        pool.queued.fetch_add(helpers, Ordering::AcqRel);
    }
    for _ in 0..helpers {
        pool.wake.notify_one();
    }
    {
        let _close = CloseOnDrop(&task);
        task.drain();
    }
    if task.panicked.load(Ordering::Relaxed) {
        panic!("a piece of a split copy panicked on a helper thread");
    }
}

/// Runs `work(offset, piece)` for every `piece`-byte piece of `dst` (the last may be
/// shorter) through [`for_each`]: each piece handed out once, mutably.
pub(crate) fn for_each_piece(
    dst: &mut [u8],
    piece: usize,
    threads: usize,
    work: &(dyn Fn(usize, &mut [u8]) + Sync),
) {
    let pieces: Vec<Mutex<Option<&mut [u8]>>> =
        dst.chunks_mut(piece).map(|p| Mutex::new(Some(p))).collect();
    for_each(pieces.len(), threads, &|i| {
        let taken = pieces
            .get(i)
            .and_then(|p| p.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(p) = taken {
            work(i * piece, p);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_runs_exactly_once() {
        for n in [0, 1, 2, 3, 17, 1000] {
            let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each(n, 4, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "{n}");
        }
    }

    #[test]
    fn pieces_write_disjoint_parts_of_a_borrowed_buffer() {
        let mut buf = vec![
            0u8;
            if cfg!(miri) {
                (64 << 10) + 100
            } else {
                (1 << 20) + 100
            }
        ];
        for_each_piece(&mut buf, 4096, 4, &|off, piece| {
            piece.fill((off / 4096) as u8)
        });
        for (i, c) in buf.chunks(4096).enumerate() {
            assert!(c.iter().all(|&b| b == i as u8));
        }
    }

    #[test]
    fn many_callers_at_once_each_get_their_own_pieces() {
        std::thread::scope(|s| {
            for t in 0..4usize {
                s.spawn(move || {
                    for round in 0..if cfg!(miri) { 10 } else { 200 } {
                        let sum = AtomicUsize::new(0);
                        for_each(8 + round % 5, 3, &|i| {
                            sum.fetch_add(i + t, Ordering::Relaxed);
                        });
                        let n = 8 + round % 5;
                        assert_eq!(sum.into_inner(), n * (n - 1) / 2 + n * t);
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_piece_is_reraised_after_the_others_stop() {
        let done = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            for_each(64, 4, &|i| {
                assert!(i != 5, "piece 5 fails");
                done.fetch_add(1, Ordering::Relaxed);
            });
        }));
        assert!(r.is_err());
        assert!(done.load(Ordering::Relaxed) < 64);
        // The pool still works.
        let sum = AtomicUsize::new(0);
        for_each(10, 4, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 45);
    }
}
