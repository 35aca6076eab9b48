//! [`Ordered`]: turns a raw byte stream into a [`Connection`](crate::Connection).
//!
//! A backend supplies a [`Stream`] — "read exactly this much", "write all of these",
//! "shut down" — and `Ordered` adds what every transport must guarantee: operations
//! queue when issued and complete in issue order (reads and writes separately);
//! `close` fails pending and later operations with [`TransportError::Closed`]; an
//! operation abandoned halfway through its I/O breaks the connection
//! ([`TransportError::Broken`]); length-prefixed frames are bounded before allocation.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::order::Order;
use crate::{Connection, TransportError};

/// A backend's byte stream. Calls for one direction never overlap (`Ordered` serialises
/// them), but a read and a write may run concurrently.
pub(crate) trait Stream: Send + Sync + 'static {
    /// Fills `buf` from the stream.
    fn read_into<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = Result<(), TransportError>> + Send + 'a;

    /// Writes every buffer in order.
    fn write_from<'a>(
        &'a self,
        bufs: &'a [&'a [u8]],
    ) -> impl Future<Output = Result<(), TransportError>> + Send + 'a;

    /// Whether [`Stream::try_read_into`] and [`Stream::try_write_from`] can ever say
    /// yes; when not, `Ordered` does not take its queue's lock to ask.
    const NOW: bool = false;

    /// Whether the peer's bytes land where [`Stream::try_read_into`] finds them without
    /// waiting for anything (shm's ring): a reader may then look for them itself (see
    /// [`Connection::reads_now`]). A stream that only hands out bytes it already read
    /// (tcp's read-ahead) says no.
    const BY_LOOKING: bool = false;

    /// Fills `buf` now if the stream already holds that many bytes; otherwise reads
    /// nothing and returns `false` (errors too: the async path reports them). The
    /// default never reads.
    fn try_read_into(&self, buf: &mut [u8]) -> bool {
        let _ = buf;
        false
    }

    /// Writes every buffer now if they all fit without waiting; otherwise writes
    /// nothing and returns `false`. The default never writes.
    fn try_write_from(&self, bufs: &[&[u8]]) -> bool {
        let _ = bufs;
        false
    }

    /// Stops the stream so pending reads and writes return promptly. Idempotent.
    fn shutdown(&self);
}

/// A [`Stream`] with ordering, close and framing.
#[derive(Debug)]
pub(crate) struct Ordered<S> {
    pub(crate) stream: S,
    reads: Order,
    writes: Order,
    closed: AtomicBool,
    broken: AtomicBool,
}

/// Marks the connection broken if an operation is dropped halfway through its I/O.
struct Halfway<'a, S: Stream> {
    conn: &'a Ordered<S>,
    armed: bool,
}

impl<S: Stream> Drop for Halfway<'_, S> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.broken.store(true, Ordering::Release);
            self.conn.close();
        }
    }
}

impl<S: Stream> Ordered<S> {
    pub(crate) fn new(stream: S) -> Self {
        Self {
            stream,
            reads: Order::default(),
            writes: Order::default(),
            closed: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn check(&self) -> Result<(), TransportError> {
        if self.broken.load(Ordering::Acquire) {
            Err(TransportError::Broken)
        } else if self.is_closed() {
            Err(TransportError::Closed)
        } else {
            Ok(())
        }
    }

    /// Runs one operation: waits for its turn, then does the I/O, reporting a local close
    /// (or breakage) in place of whatever error the interrupted I/O saw.
    async fn op<T>(
        &self,
        turn: crate::order::Turn,
        io: impl Future<Output = Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        turn.ready().await;
        self.check()?;
        let mut guard = Halfway {
            conn: self,
            armed: true,
        };
        let r = io.await;
        guard.armed = false;
        match r {
            // A refused frame closed the connection on purpose: report why.
            Err(e @ TransportError::FrameTooLarge { .. }) => Err(e),
            Err(e) => Err(self.check().err().unwrap_or(e)),
            ok => ok,
        }
    }

    pub(crate) fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.stream.shutdown();
        }
    }
}

impl<S: Stream + std::fmt::Debug> Connection for Ordered<S> {
    fn write<'a>(&'a self, bufs: &'a [&'a [u8]]) -> BoxFuture<'a, Result<(), TransportError>> {
        let turn = self.writes.turn();
        self.op(turn, self.stream.write_from(bufs)).boxed()
    }

    fn read_exact<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), TransportError>> {
        let turn = self.reads.turn();
        self.op(turn, self.stream.read_into(buf)).boxed()
    }

    fn try_write(&self, bufs: &[&[u8]]) -> bool {
        S::NOW && self.check().is_ok() && self.writes.try_now(|| self.stream.try_write_from(bufs))
    }

    fn try_read_exact(&self, buf: &mut [u8]) -> bool {
        S::NOW && self.check().is_ok() && self.reads.try_now(|| self.stream.try_read_into(buf))
    }

    fn reads_now(&self) -> bool {
        S::BY_LOOKING
    }

    fn read_frame(&self, limit: u64) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        let turn = self.reads.turn();
        let io = async move {
            let mut len = [0u8; 8];
            self.stream.read_into(&mut len).await?;
            let len = u64::from_le_bytes(len);
            if len > limit {
                // Cut off before allocating; a frame we will not read leaves the stream
                // mid-frame, so the connection cannot go on.
                self.close();
                return Err(TransportError::FrameTooLarge { len, limit });
            }
            let n =
                usize::try_from(len).map_err(|_| TransportError::FrameTooLarge { len, limit })?;
            let mut body = Vec::new();
            body.try_reserve_exact(n).map_err(|_| {
                TransportError::io("allocate frame", io::ErrorKind::OutOfMemory.into())
            })?;
            body.resize(n, 0);
            self.stream.read_into(&mut body).await?;
            Ok(body)
        };
        self.op(turn, io).boxed()
    }

    fn write_frame<'a>(&'a self, body: &'a [u8]) -> BoxFuture<'a, Result<(), TransportError>> {
        let turn = self.writes.turn();
        async move {
            let len = u64::try_from(body.len()).unwrap_or(u64::MAX).to_le_bytes();
            self.op(turn, self.stream.write_from(&[&len, body])).await
        }
        .boxed()
    }

    fn close(&self) {
        Self::close(self);
    }
}

impl<S: Stream> crate::registry::Closable for Ordered<S> {
    fn close(&self) {
        Self::close(self);
    }
}

/// Implements [`Connection`] and `Drop` (close) for a public connection type whose
/// `inner` field is an `Arc<Ordered<_>>`.
macro_rules! ordered_connection {
    ($ty:ty) => {
        impl $crate::Connection for $ty {
            fn write<'a>(
                &'a self,
                bufs: &'a [&'a [u8]],
            ) -> futures::future::BoxFuture<'a, Result<(), $crate::TransportError>> {
                self.inner.write(bufs)
            }

            fn read_exact<'a>(
                &'a self,
                buf: &'a mut [u8],
            ) -> futures::future::BoxFuture<'a, Result<(), $crate::TransportError>> {
                self.inner.read_exact(buf)
            }

            fn try_write(&self, bufs: &[&[u8]]) -> bool {
                self.inner.try_write(bufs)
            }

            fn try_read_exact(&self, buf: &mut [u8]) -> bool {
                self.inner.try_read_exact(buf)
            }

            fn reads_now(&self) -> bool {
                $crate::Connection::reads_now(&*self.inner)
            }

            fn read_frame(
                &self,
                limit: u64,
            ) -> futures::future::BoxFuture<'_, Result<Vec<u8>, $crate::TransportError>> {
                self.inner.read_frame(limit)
            }

            fn write_frame<'a>(
                &'a self,
                body: &'a [u8],
            ) -> futures::future::BoxFuture<'a, Result<(), $crate::TransportError>> {
                self.inner.write_frame(body)
            }

            fn close(&self) {
                self.inner.close();
            }
        }

        impl Drop for $ty {
            fn drop(&mut self) {
                self.inner.close();
            }
        }
    };
}

pub(crate) use ordered_connection;
