//! The protocol shared by xth and cma: the sender tells the receiver where its bytes
//! are, the receiver fetches them and acknowledges, and only then does the sender get
//! its buffer back.
//!
//! Connection 0 carries one frame per tensor, sender → receiver: a descriptor saying
//! where the bytes are (a registry token for xth, `{pid, address, length}` for cma).
//! Connection 1 carries one byte per tensor, receiver → sender: 0 when the bytes were
//! fetched, 1 when fetching failed. Zero-length tensors send nothing.
//!
//! Sends pipeline: a send writes its descriptor as soon as earlier sends wrote theirs,
//! and waits for its acknowledgement in the same order. A send or receive abandoned
//! between those two steps would leave the pairing unknown, so it closes the channel.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tp_transport::BoxConnection;
use tp_transport::order::{Order, Turn};

use crate::children::{Children, Close};
use crate::ops::Ops;
use crate::{BoxChannel, Channel, ChannelError, Device, RecvBuf, RecvDone, SendBuf, SendDone};

/// Descriptors are small; anything longer is a protocol violation.
const MAX_DESCRIPTOR: u64 = 64;

/// How a receiver gets at a sender's bytes.
pub trait Fetch: Send + Sync + 'static {
    /// What the sender keeps until the acknowledgement.
    type Held: Send + 'static;

    /// Sender: makes `buf` reachable by the peer; returns the descriptor to send.
    fn publish(&self, buf: Box<dyn SendBuf>) -> (Vec<u8>, Self::Held);

    /// Sender: the buffer back, once the receiver is done with it.
    fn take_back(&self, held: Self::Held) -> Box<dyn SendBuf>;

    /// Sender: a send was abandoned after its descriptor may have reached the peer,
    /// which may still be reading the bytes. The default drops the buffer; a fetch that
    /// reads the sender's memory directly must not (cma leaks it instead: the peer then
    /// reads intact bytes, never freed memory).
    fn abandon(&self, held: Self::Held) {
        drop(held);
    }

    /// Receiver: fills `dst` from the bytes `descriptor` names.
    ///
    /// # Errors
    /// A malformed descriptor, a length other than `dst`'s, or a failed fetch.
    fn fetch(&self, descriptor: &[u8], dst: &mut dyn RecvBuf) -> Result<(), ChannelError>;

    /// Whether buffers on `device` can be sent and received. Default: the CPU only.
    fn accepts(&self, device: Device) -> bool {
        device == Device::CPU
    }
}

struct Inner<F> {
    name: &'static str,
    fetch: F,
    /// Connection 0: descriptors, sender → receiver.
    descriptors: BoxConnection,
    /// Connection 1: acknowledgements, receiver → sender.
    acks: BoxConnection,
    ops: Ops,
    /// Sends wait for their acknowledgements in this order.
    send_acks: Order,
}

impl<F: Send + Sync> Close for Inner<F> {
    fn close(&self) {
        Self::close(self);
    }
}

impl<F: Fetch> Inner<F> {
    /// [`Ops::start`] after checking that the fetch moves memory of `device` (if not,
    /// the channel closes: the peer's matching operation can no longer pair up).
    async fn start(&self, turn: &Turn, device: Device, len: usize) -> Result<bool, ChannelError> {
        if !self.fetch.accepts(device) {
            self.close();
            return Err(ChannelError::UnsupportedDevice {
                channel: self.name,
                device,
            });
        }
        self.ops.start(turn, len).await
    }
}

impl<F> Inner<F> {
    fn close(&self) {
        if self.ops.mark_closed() {
            self.descriptors.close();
            self.acks.close();
        }
    }
}

/// Closes the channel if dropped while armed (an operation abandoned mid-way).
struct Midway<'a, F> {
    inner: &'a Inner<F>,
    armed: bool,
}

impl<F> Drop for Midway<'_, F> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.close();
        }
    }
}

/// A published buffer: handed back with [`Published::take`], or abandoned on drop.
struct Published<'a, F: Fetch> {
    fetch: &'a F,
    held: Option<F::Held>,
}

impl<F: Fetch> Published<'_, F> {
    fn take(mut self) -> Box<dyn SendBuf> {
        let held = self.held.take();
        held.map_or_else(
            || Box::new(Vec::new()) as Box<dyn SendBuf>,
            |h| self.fetch.take_back(h),
        )
    }
}

impl<F: Fetch> Drop for Published<'_, F> {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            self.fetch.abandon(held);
        }
    }
}

/// A channel over two connections and a [`Fetch`].
pub struct HandoffChannel<F> {
    name: &'static str,
    inner: Arc<Inner<F>>,
}

impl<F> std::fmt::Debug for HandoffChannel<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.name)
            .field("closed", &self.inner.ops.is_closed())
            .finish()
    }
}

impl<F: Fetch> HandoffChannel<F> {
    /// The handle a context closes this channel by.
    pub fn closer(&self) -> std::sync::Weak<dyn Close> {
        Arc::downgrade(&self.inner) as std::sync::Weak<dyn Close>
    }

    /// Builds the channel; `conns` must hold exactly two connections.
    pub fn new(
        name: &'static str,
        fetch: F,
        conns: Vec<BoxConnection>,
    ) -> Result<Self, ChannelError> {
        let [descriptors, acks]: [BoxConnection; 2] = conns.try_into().map_err(|c: Vec<_>| {
            ChannelError::protocol(format!("{name} needs 2 connections, got {}", c.len()))
        })?;
        Ok(Self {
            name,
            inner: Arc::new(Inner {
                name,
                fetch,
                descriptors,
                acks,
                ops: Ops::default(),
                send_acks: Order::default(),
            }),
        })
    }
}

impl<F: Fetch> Channel for HandoffChannel<F> {
    fn send(&self, buf: Box<dyn SendBuf>) -> BoxFuture<'static, SendDone> {
        let turn = self.inner.ops.send_turn();
        let ack_turn = self.inner.send_acks.turn();
        let inner = self.inner.clone();
        async move {
            match inner.start(&turn, buf.device(), buf.byte_len()).await {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let (descriptor, held) = inner.fetch.publish(buf);
            let held = Published {
                fetch: &inner.fetch,
                held: Some(held),
            };
            let mut midway = Midway {
                inner: &inner,
                armed: true,
            };
            if let Err(e) = inner.descriptors.write_frame(&descriptor).await {
                // A failed write did not deliver the whole descriptor, so the peer
                // cannot be reading the buffer: hand it back.
                midway.armed = false;
                return (held.take(), Err(e.into()));
            }
            drop(turn);
            ack_turn.ready().await;
            let mut ack = [0u8; 1];
            let r = inner.acks.read_exact(&mut ack).await;
            midway.armed = false;
            drop(midway);
            let result = match r {
                Ok(()) if ack == [0] => Ok(()),
                Ok(()) if ack == [1] => Err(ChannelError::protocol(
                    "the receiver could not fetch the tensor",
                )),
                Ok(()) => {
                    inner.close();
                    Err(ChannelError::protocol(format!(
                        "bad acknowledgement byte {}",
                        ack[0]
                    )))
                }
                Err(e) => Err(e.into()),
            };
            (held.take(), result)
        }
        .boxed()
    }

    fn recv(&self, mut buf: Box<dyn RecvBuf>) -> BoxFuture<'static, RecvDone> {
        let turn = self.inner.ops.recv_turn();
        let inner = self.inner.clone();
        async move {
            match inner.start(&turn, buf.device(), buf.byte_len()).await {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let descriptor = match inner.descriptors.read_frame(MAX_DESCRIPTOR).await {
                Ok(d) => d,
                Err(e) => return (buf, Err(e.into())),
            };
            let mut midway = Midway {
                inner: &inner,
                armed: true,
            };
            let fetched = inner.fetch.fetch(&descriptor, &mut *buf);
            let status = u8::from(fetched.is_err());
            let acked = inner.acks.write(&[&[status]]).await;
            midway.armed = false;
            drop(midway);
            let result = match (fetched, acked) {
                (Err(e), _) => {
                    // The stream is still in step, but a peer that sends what we cannot
                    // fetch is not one to keep talking to.
                    inner.close();
                    Err(e)
                }
                (Ok(()), Err(e)) => Err(e.into()),
                (Ok(()), Ok(())) => Ok(()),
            };
            (buf, result)
        }
        .boxed()
    }

    fn close(&self) {
        self.inner.close();
    }
}

impl<F> Drop for HandoffChannel<F> {
    fn drop(&mut self) {
        self.inner.close();
    }
}

/// The context side handoff channels share: descriptors probed at creation (or why
/// not), two connections per channel, and the channels made, for closing.
#[derive(Debug)]
pub struct HandoffContext {
    name: &'static str,
    descriptors: Result<Vec<(Device, Vec<u8>)>, String>,
    children: Arc<Children>,
}

impl HandoffContext {
    /// A context for CPU memory: the CPU's descriptor, or why the channel is not viable.
    pub fn new(name: &'static str, descriptor: Result<Vec<u8>, String>) -> Self {
        Self::with_devices(name, descriptor.map(|d| vec![(Device::CPU, d)]))
    }

    /// A context with one descriptor per device, or why the channel is not viable.
    pub fn with_devices(
        name: &'static str,
        descriptors: Result<Vec<(Device, Vec<u8>)>, String>,
    ) -> Self {
        if let Err(why) = &descriptors {
            tracing::info!(channel = name, reason = why, "channel not viable");
        }
        Self {
            name,
            descriptors,
            children: Arc::default(),
        }
    }

    /// `Ok`, or [`ChannelError::NotViable`] with the reason.
    ///
    /// # Errors
    /// [`ChannelError::NotViable`].
    pub fn viability(&self) -> Result<(), ChannelError> {
        self.descriptors
            .as_ref()
            .map(|_| ())
            .map_err(|why| ChannelError::not_viable(self.name, why))
    }

    /// The descriptors (none when not viable).
    pub fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
        self.descriptors.clone().unwrap_or_default()
    }

    /// Makes a channel over `conns` with `fetch`, adopted for [`HandoffContext::close`].
    pub fn create<F: Fetch>(
        &self,
        fetch: F,
        conns: Vec<BoxConnection>,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
        let ready = self.viability();
        let children = self.children.clone();
        let name = self.name;
        async move {
            ready?;
            if children.is_closed() {
                return Err(ChannelError::Closed);
            }
            let channel = HandoffChannel::new(name, fetch, conns)?;
            children.adopt(channel.closer());
            Ok(Box::new(channel) as BoxChannel)
        }
        .boxed()
    }

    /// Closes every channel this context made; later ones fail. Idempotent.
    pub fn close(&self) {
        self.children.close_all();
    }
}

/// Reads `N` little-endian bytes at `at` of a descriptor.
///
/// # Errors
/// [`ChannelError::Protocol`] when the descriptor is too short.
pub fn le_bytes<const N: usize>(d: &[u8], at: usize) -> Result<[u8; N], ChannelError> {
    d.get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ChannelError::protocol("short descriptor"))
}
