//! One timer for every call's deadline: a thread that sleeps until the earliest one.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

#[derive(Default)]
struct State {
    deadlines: BTreeSet<(Instant, u64)>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Deadlines keyed by call id; `fire(id)` runs on the timer's thread when one passes.
pub(crate) struct Timer {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Timer {
    /// Starts the timer's thread.
    pub(crate) fn start(name: &str, fire: impl Fn(u64) + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-timer"))
            .spawn(move || run(&s, &fire))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Fires `id` at `at`.
    pub(crate) fn add(&self, at: Instant, id: u64) {
        let mut s = self.shared.lock();
        let earliest = s.deadlines.first().is_none_or(|&(first, _)| at < first);
        s.deadlines.insert((at, id));
        drop(s);
        if earliest {
            self.shared.changed.notify_one();
        }
    }

    /// Forgets `id`'s deadline `at` (the call completed first).
    pub(crate) fn remove(&self, at: Instant, id: u64) {
        self.shared.lock().deadlines.remove(&(at, id));
    }

    /// How many deadlines are pending.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shared.lock().deadlines.len()
    }

    /// Stops the thread (pending deadlines never fire). Idempotent.
    pub(crate) fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_one();
        let t = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = t
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &Shared, fire: &dyn Fn(u64)) {
    let mut s = shared.lock();
    loop {
        if s.stop {
            return;
        }
        let now = Instant::now();
        match s.deadlines.first().copied() {
            Some((at, id)) if at <= now => {
                s.deadlines.remove(&(at, id));
                drop(s);
                fire(id);
                s = shared.lock();
            }
            Some((at, _)) => {
                s = shared
                    .changed
                    .wait_timeout(s, at - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            None => {
                s = shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deadlines_fire_in_order_and_removed_ones_do_not() {
        let (tx, rx) = std::sync::mpsc::channel();
        let timer = Timer::start("t", move |id| tx.send(id).unwrap()).unwrap();
        let t0 = Instant::now();
        timer.add(t0 + Duration::from_millis(60), 3);
        timer.add(t0 + Duration::from_millis(20), 1);
        timer.add(t0 + Duration::from_millis(40), 2);
        timer.remove(t0 + Duration::from_millis(40), 2);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 3);
        assert!(t0.elapsed() >= Duration::from_millis(60));
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        assert_eq!(timer.len(), 0);
        timer.add(Instant::now() + Duration::from_secs(3600), 4);
        timer.stop(); // does not wait for the hour
    }
}
