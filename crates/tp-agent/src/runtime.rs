//! The thread a context's pipes do their I/O on.
//!
//! One thread runs every task with `async_io::block_on`, so when all tasks wait, that
//! same thread sleeps in the reactor (epoll) and a socket event wakes it directly — no
//! second thread to hop through. (A `futures` thread pool parks its threads on a
//! condition variable and leaves epoll to async-io's helper thread: every wake-up
//! then costs two thread switches; on an idle VM that made a 1 KiB round trip 7× as
//! slow.)

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures::channel::mpsc;
use futures::stream::{FuturesUnordered, StreamExt};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A handle to spawn tasks on the runtime thread. Clones share the thread.
#[derive(Clone, Debug)]
pub(crate) struct Runtime {
    tasks: mpsc::UnboundedSender<Task>,
}

impl Runtime {
    /// Starts the thread.
    ///
    /// # Errors
    /// The OS refused a thread.
    pub(crate) fn start(name: &str) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::unbounded::<Task>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut running = FuturesUnordered::new();
                async_io::block_on(std::future::poll_fn(|cx| {
                    let mut open = true;
                    loop {
                        match rx.poll_next_unpin(cx) {
                            Poll::Ready(Some(task)) => running.push(task),
                            Poll::Ready(None) => {
                                open = false;
                                break;
                            }
                            Poll::Pending => break,
                        }
                    }
                    while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
                    if !open && running.is_empty() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                }));
            })?;
        Ok(Self { tasks: tx })
    }

    /// Runs `task` on the runtime thread.
    pub(crate) fn spawn_ok(&self, task: impl Future<Output = ()> + Send + 'static) {
        let _ = self.tasks.unbounded_send(Box::pin(task));
    }
}
