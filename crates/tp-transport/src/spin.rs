//! Whether an operation may spin on this thread right now.
//!
//! The shm and tcp transports spin for a while before they park a read, so a reply
//! already on its way is seen at once; a spin yields to the executor between its tries
//! ([`yield_once`], or [`yield_for_io`] where the executor should also look at its
//! reactor soon). That is right for a task that
//! waits anyway, and wrong for a caller that only *looks*: tp-agent's pipe polls a read
//! once, right where it is issued, to take bytes that are already there without a
//! thread hop; if none are, the read continues on the connection's task. Such a look
//! runs inside [`without_spinning`], and every spin checks for it first.

use std::cell::Cell;

thread_local! {
    static SUPPRESSED: Cell<bool> = const { Cell::new(false) };
    static WANTS_IO: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with spinning off on this thread: a transport operation polled inside
/// checks for its bytes once and returns `Pending` if they are not there, instead of
/// spinning for them first.
pub fn without_spinning<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SUPPRESSED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SUPPRESSED.with(|s| s.replace(true)));
    f()
}

/// Returns `Pending` once (waking itself at once), so the executor runs its other
/// tasks before this one goes on: the pause between two checks of a spinning wait (the
/// shm transport's ring, tp-cuda's event queries).
pub async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

/// Like [`yield_once`], and asks the executor to poll its reactor soon: a task that
/// spins on a socket must not keep the other tasks' I/O from being noticed (tcp's
/// spinning reads; tp-agent's runtime honours it, see [`take_io_request`]).
pub async fn yield_for_io() {
    WANTS_IO.with(|w| w.set(true));
    yield_once().await;
}

/// Whether a task on this thread called [`yield_for_io`] since the last call, which
/// clears the request. For executors that poll a reactor between rounds of tasks.
pub fn take_io_request() -> bool {
    WANTS_IO.with(|w| w.replace(false))
}

/// False inside [`without_spinning`]: a wait may spin (and give its core away) only
/// where this is true; else it checks once and returns `Pending`.
pub fn allowed() -> bool {
    !SUPPRESSED.with(Cell::get)
}

/// One pause of a spinning wait whose clock is `start` (started by the first call):
/// `false` once `budget` has passed since — park now. Otherwise it gives this core to
/// any thread that wants it (`sched_yield`: on a machine whose other cores are taken,
/// a spin must not delay the very answer it waits for) and this thread to the
/// executor's other tasks and reactor ([`yield_for_io`]), then returns `true`: try
/// again. Used by tcp's reads and mpt's task-driven lanes; callers check [`allowed`]
/// first, since a look must neither start the clock nor give the core away.
pub async fn pause(start: &mut Option<std::time::Instant>, budget: std::time::Duration) -> bool {
    if start.get_or_insert_with(std::time::Instant::now).elapsed() >= budget {
        return false;
    }
    std::thread::yield_now();
    yield_for_io().await;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_yields_until_the_budget_is_spent() {
        futures::executor::block_on(async {
            let mut start = None;
            assert!(pause(&mut start, std::time::Duration::from_secs(60)).await);
            assert!(start.is_some(), "the first pause starts the clock");
            assert!(
                take_io_request(),
                "a pause asks the executor to look at its reactor"
            );
            assert!(!pause(&mut None, std::time::Duration::ZERO).await);
        });
    }

    #[test]
    fn suppression_nests_and_ends_with_its_scope() {
        assert!(allowed());
        without_spinning(|| {
            assert!(!allowed());
            without_spinning(|| assert!(!allowed()));
            assert!(!allowed());
        });
        assert!(allowed());
        let caught = std::panic::catch_unwind(|| without_spinning(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(allowed(), "a panic inside must not leave spinning off");
    }
}
