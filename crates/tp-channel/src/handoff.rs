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
//!
//! **Help.** A sender waiting for its acknowledgement has nothing else to do, so a
//! fetch may let it do part of the work ([`Fetch::offer_help`]; xth and cma do, for
//! large tensors, over connections that read by looking). A descriptor that offers help
//! keeps connection 0 to its send until the receiver has answered. The receiver may
//! then ask, on connection 1, before its acknowledgement: byte 2, then a frame holding
//! the fetch's request — "put bytes `from..` of yours in place yourself". It fetches
//! `..from` meanwhile; the sender does the rest ([`Fetch::help`]) and answers on
//! connection 0 with one byte: 0 done, 1 failed (the receiver then fetches `from..`
//! itself). From the request until the answer the sender may be writing into the
//! receive buffer, so a receive that cannot hear the answer (closed, abandoned) never
//! frees that buffer: it is leaked, as cma's abandoned sends are — unless the fetch can
//! tell that the sender can no longer write ([`Fetch::helper_gone`]: cma, when the
//! peer's process is gone, the common case of a peer that died mid-transfer; xth,
//! always, once it has taken its loan back).

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tp_transport::BoxConnection;
use tp_transport::order::{Order, Turn};

use crate::children::{Children, Close};
use crate::ops::Ops;
use crate::{BoxChannel, Channel, ChannelError, Device, RecvBuf, RecvDone, SendBuf, SendDone};

/// Descriptors and help requests are small; anything longer is a protocol violation.
const MAX_DESCRIPTOR: u64 = 64;

/// Connection 1: the receiver fetched the tensor.
const ACK_OK: u8 = 0;
/// Connection 1: the receiver could not fetch the tensor.
const ACK_FAILED: u8 = 1;
/// Connection 1: a help request (a frame) follows.
const ASK_HELP: u8 = 2;

/// What a receiver asks of a sender that offered help ([`Fetch::ask_help`]).
#[derive(Debug)]
pub struct Help {
    /// The receiver fetches bytes `..from` itself; the sender puts `from..` in place.
    pub from: usize,
    /// The request the sender's [`Fetch::help`] reads (at most 64 bytes).
    pub request: Vec<u8>,
}

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

    /// Sender: whether to offer help with `held`; if so, says so in `descriptor` (what
    /// `publish` made) and returns `true`. An offer keeps connection 0 to its send until
    /// the receiver has answered, so sends issued after it (`queued`: some were when it
    /// published) write their descriptors later. Asked only when both connections read
    /// by looking ([`Connection::reads_now`](tp_transport::Connection::reads_now): shm):
    /// where a message costs a wake-up (tcp), the request and the answer cost more than
    /// half a copy saves. Default: never offers.
    fn offer_help(&self, held: &Self::Held, queued: bool, descriptor: &mut Vec<u8>) -> bool {
        let _ = (held, queued, descriptor);
        false
    }

    /// Receiver: whether to ask the sender of `descriptor` for help with `dst`, and
    /// what; `None` (the default) fetches it all here — and so must a fetch whose
    /// descriptor did not offer help. `descriptor` stays in place until the sender has
    /// answered, so the request may point into it.
    ///
    /// # Errors
    /// A malformed descriptor or a length other than `dst`'s.
    fn ask_help(
        &self,
        descriptor: &[u8],
        dst: &mut dyn RecvBuf,
    ) -> Result<Option<Help>, ChannelError> {
        let _ = (descriptor, dst);
        Ok(None)
    }

    /// Receiver: fills `dst[range]` only — a part of a tensor whose sender helps.
    /// Called only by a fetch whose [`Fetch::ask_help`] asks. The default refuses.
    ///
    /// # Errors
    /// As [`Fetch::fetch`].
    fn fetch_part(
        &self,
        descriptor: &[u8],
        dst: &mut dyn RecvBuf,
        range: std::ops::Range<usize>,
    ) -> Result<(), ChannelError> {
        let _ = (descriptor, dst, range);
        Err(ChannelError::protocol(
            "this channel cannot fetch part of a tensor",
        ))
    }

    /// Receiver: whether the sender of `descriptor` can no longer be writing (cma: its
    /// process is gone; xth: the loan was taken back), asked when the connection failed
    /// while help was under way. Then the receive buffer comes back with the error
    /// instead of being leaked. Default: no one can tell.
    fn helper_gone(&self, descriptor: &[u8]) -> bool {
        let _ = descriptor;
        false
    }

    /// Receiver: the sender of `descriptor` answered a help request, so it no longer
    /// writes into the receive buffer; a fetch that lent it memory ends the loan here.
    /// Default: nothing to do.
    fn help_answered(&self, descriptor: &[u8]) {
        let _ = descriptor;
    }

    /// Sender: does what the receiver's help `request` asks with the bytes of `held`.
    /// The default refuses (a fetch that never offers help never gets a request).
    ///
    /// # Errors
    /// A malformed or unacceptable request, or a failed copy.
    fn help(&self, held: &Self::Held, request: &[u8]) -> Result<(), ChannelError> {
        let _ = (held, request);
        Err(ChannelError::protocol("help was not offered"))
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

impl<F: Fetch> Inner<F> {
    /// Sender: reads a help request (its byte was read), does it, answers on
    /// connection 0 and gives that connection's `turn` up. A failed copy is answered,
    /// not returned: the receiver then fetches the rest itself.
    async fn help(
        &self,
        held: &mut Published<'_, F>,
        turn: Option<Turn>,
    ) -> Result<(), ChannelError> {
        let request = self.acks.read_frame(MAX_DESCRIPTOR).await?;
        let helped = held
            .held
            .as_ref()
            .map_or(Err(ChannelError::Closed), |h| self.fetch.help(h, &request));
        if let Err(e) = &helped {
            tracing::debug!(channel = self.name, error = %e, "could not help the receiver");
        }
        let answer = if helped.is_ok() { ACK_OK } else { ACK_FAILED };
        let written = self.descriptors.write(&[&[answer]]).await;
        drop(turn);
        written.map_err(Into::into)
    }

    /// Receiver: asks the sender for `help`, fetches the rest meanwhile, and waits for
    /// the sender's answer. Returns the buffer once the sender is done with it (it
    /// answered, or its process is gone), or `None` when that cannot be known (the
    /// buffer is then leaked).
    async fn helped(
        &self,
        descriptor: &[u8],
        buf: Box<dyn RecvBuf>,
        help: Help,
    ) -> (Option<Box<dyn RecvBuf>>, Result<(), ChannelError>) {
        let mut lent = Lent(Some(buf));
        let Some(buf) = lent.0.as_deref_mut() else {
            return (None, Err(ChannelError::Closed));
        };
        let len = buf.byte_len();
        let from = help.from.min(len);
        let frame_len = (help.request.len() as u64).to_le_bytes();
        if let Err(e) = self
            .acks
            .write(&[&[ASK_HELP], &frame_len, &help.request])
            .await
        {
            return (self.back_if_gone(descriptor, &mut lent), Err(e.into()));
        }
        let mine = self.fetch.fetch_part(descriptor, buf, 0..from);
        let mut answer = [0u8; 1];
        if let Err(e) = self.descriptors.read_exact(&mut answer).await {
            return (self.back_if_gone(descriptor, &mut lent), Err(e.into()));
        }
        // The sender answered: it no longer touches the buffer.
        self.fetch.help_answered(descriptor);
        let Some(mut buf) = lent.0.take() else {
            return (None, Err(ChannelError::Closed));
        };
        let fetched = match answer[0] {
            ACK_OK => mine,
            ACK_FAILED => {
                mine.and_then(|()| self.fetch.fetch_part(descriptor, &mut *buf, from..len))
            }
            other => Err(ChannelError::protocol(format!(
                "bad answer to a help request: {other}"
            ))),
        };
        (Some(buf), fetched)
    }
}

impl<F: Fetch> Inner<F> {
    /// The lent buffer, if the sender of `descriptor` is gone and so cannot write into
    /// it any more.
    fn back_if_gone(&self, descriptor: &[u8], lent: &mut Lent) -> Option<Box<dyn RecvBuf>> {
        if self.fetch.helper_gone(descriptor) {
            lent.0.take()
        } else {
            None
        }
    }
}

/// A receive buffer the peer may be writing into: leaked if dropped while held.
struct Lent(Option<Box<dyn RecvBuf>>);

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            tracing::warn!(
                bytes = buf.byte_len(),
                "a receive ended while its sender may still write into its buffer; the buffer is leaked"
            );
            std::mem::forget(buf);
        }
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
            let (mut descriptor, held) = inner.fetch.publish(buf);
            let offers_help = inner.descriptors.reads_now()
                && inner.acks.reads_now()
                && inner
                    .fetch
                    .offer_help(&held, !turn.is_last(), &mut descriptor);
            let mut held = Published {
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
            // Connection 0 stays ours while the receiver may still ask for help.
            let mut turn = Some(turn).filter(|_| offers_help);
            ack_turn.ready().await;
            let r = loop {
                let mut ack = [0u8; 1];
                if let Err(e) = inner.acks.read_exact(&mut ack).await {
                    break Err(e.into());
                }
                match ack[0] {
                    ACK_OK => break Ok(()),
                    ACK_FAILED => {
                        break Err(ChannelError::protocol(
                            "the receiver could not fetch the tensor",
                        ));
                    }
                    ASK_HELP if turn.is_some() => {
                        if let Err(e) = inner.help(&mut held, turn.take()).await {
                            break Err(e);
                        }
                    }
                    other => {
                        inner.close();
                        break Err(ChannelError::protocol(format!(
                            "bad acknowledgement byte {other}"
                        )));
                    }
                }
            };
            midway.armed = false;
            drop(midway);
            drop(turn);
            (held.take(), r)
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
            let fetched = match inner.fetch.ask_help(&descriptor, &mut *buf) {
                Ok(None) => inner.fetch.fetch(&descriptor, &mut *buf),
                Ok(Some(help)) => match inner.helped(&descriptor, buf, help).await {
                    (Some(back), fetched) => {
                        buf = back;
                        fetched
                    }
                    (None, e) => {
                        // The sender may still be writing into the buffer: it was
                        // leaked, and the peer is not heard from again.
                        inner.close();
                        return (Box::new(Vec::new()), e);
                    }
                },
                Err(e) => Err(e),
            };
            let status = if fetched.is_ok() { ACK_OK } else { ACK_FAILED };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tp_transport::Transport;
    use tp_transport::shm::ShmTransport;
    use tp_transport::tcp::TcpTransport;

    /// Carries the bytes in the descriptor itself, after a byte saying whether it
    /// offers help; asks whenever offered (or always, if `asks_anyway`); its help always
    /// fails.
    struct Inline {
        offers: bool,
        asks_anyway: bool,
        gone: bool,
        helps: Arc<AtomicUsize>,
    }

    impl Fetch for Inline {
        type Held = Box<dyn SendBuf>;

        fn publish(&self, buf: Box<dyn SendBuf>) -> (Vec<u8>, Self::Held) {
            let mut d = vec![0];
            d.extend_from_slice(buf.bytes());
            (d, buf)
        }

        fn take_back(&self, held: Self::Held) -> Box<dyn SendBuf> {
            held
        }

        fn fetch(&self, d: &[u8], dst: &mut dyn RecvBuf) -> Result<(), ChannelError> {
            self.fetch_part(d, dst, 0..d.len() - 1)
        }

        fn offer_help(&self, _: &Self::Held, _: bool, d: &mut Vec<u8>) -> bool {
            d[0] = u8::from(self.offers);
            self.offers
        }

        fn ask_help(&self, d: &[u8], _: &mut dyn RecvBuf) -> Result<Option<Help>, ChannelError> {
            Ok((d[0] == 1 || self.asks_anyway).then(|| Help {
                from: d.len() / 2,
                request: b"please".to_vec(),
            }))
        }

        fn fetch_part(
            &self,
            d: &[u8],
            dst: &mut dyn RecvBuf,
            range: std::ops::Range<usize>,
        ) -> Result<(), ChannelError> {
            dst.bytes_mut()[range.clone()].copy_from_slice(&d[range.start + 1..range.end + 1]);
            Ok(())
        }

        fn helper_gone(&self, _: &[u8]) -> bool {
            self.gone
        }

        fn help(&self, _: &Self::Held, request: &[u8]) -> Result<(), ChannelError> {
            assert_eq!(request, b"please");
            self.helps.fetch_add(1, Ordering::Relaxed);
            Err(ChannelError::protocol("no help today"))
        }
    }

    type Pair = (
        HandoffChannel<Inline>,
        HandoffChannel<Inline>,
        Arc<AtomicUsize>,
    );

    async fn pair(shm: bool, offers: bool, asks_anyway: bool) -> Pair {
        pair_gone(shm, offers, asks_anyway, false).await
    }

    async fn pair_gone(shm: bool, offers: bool, asks_anyway: bool, gone: bool) -> Pair {
        let t: Box<dyn Transport> = if shm {
            Box::new(ShmTransport::default())
        } else {
            Box::new(TcpTransport::new())
        };
        let l = t.listen(if shm { "" } else { "127.0.0.1:0" }).unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..2 {
            let (c, s) = futures::future::join(t.connect(l.address()), l.accept()).await;
            a.push(c.unwrap());
            b.push(s.unwrap());
        }
        let helps = Arc::new(AtomicUsize::new(0));
        let make = |conns| {
            HandoffChannel::new(
                "inline",
                Inline {
                    offers,
                    asks_anyway,
                    gone,
                    helps: helps.clone(),
                },
                conns,
            )
            .unwrap()
        };
        (make(a), make(b), helps)
    }

    /// Five 40-byte tensors a → b at once; every one must arrive intact.
    async fn five_tensors((a, b, _): &Pair) {
        let data: Vec<Vec<u8>> = (0..5u8).map(|i| (i..i + 40).collect()).collect();
        let sends = futures::future::join_all(
            data.iter()
                .map(|d| a.send(Box::new(d.clone()) as Box<dyn SendBuf>)),
        );
        let recvs = futures::future::join_all(
            data.iter()
                .map(|_| b.recv(Box::new(vec![0u8; 40]) as Box<dyn RecvBuf>)),
        );
        let (sent, got) = futures::future::join(sends, recvs).await;
        for (i, ((_, rs), (buf, rr))) in sent.into_iter().zip(got).enumerate() {
            rs.unwrap();
            rr.unwrap();
            assert_eq!(buf.bytes(), &data[i][..], "tensor {i}");
        }
    }

    /// Five tensors over a pair whose fetch offers help, over shm or tcp: how often
    /// the sender was asked.
    fn helps_asked_for_five_tensors(shm: bool) -> usize {
        futures::executor::block_on(async {
            let p = pair(shm, true, false).await;
            five_tensors(&p).await;
            p.2.load(Ordering::Relaxed)
        })
    }

    #[test]
    fn a_sender_that_cannot_help_leaves_the_rest_to_the_receiver() {
        assert_eq!(
            helps_asked_for_five_tensors(true),
            5,
            "every send asked once"
        );
    }

    #[test]
    fn help_is_offered_only_over_connections_that_read_by_looking() {
        assert_eq!(helps_asked_for_five_tensors(false), 0, "tcp: never offered");
    }

    /// One 40-byte tensor whose receiver asks a sender that did not offer (over shm),
    /// with a fetch that can or cannot tell the sender is `gone`: both results, the
    /// buffer the receive gave back, and the pair.
    fn ask_unoffered(gone: bool) -> (SendDone, RecvDone, Pair) {
        futures::executor::block_on(async {
            let p = pair_gone(true, false, true, gone).await;
            let (sent, got) = futures::future::join(
                p.0.send(Box::new(vec![7u8; 40])),
                p.1.recv(Box::new(vec![0u8; 40])),
            )
            .await;
            (sent, got, p)
        })
    }

    #[test]
    fn asking_a_sender_that_did_not_offer_closes_the_channel_and_keeps_the_buffer_away() {
        let ((_, rs), (buf, rr), (a, b, helps)) = ask_unoffered(false);
        assert!(matches!(rs, Err(ChannelError::Protocol(_))), "{rs:?}");
        assert!(rr.is_err(), "{rr:?}");
        // The sender might have been writing into it: the receive gives back an
        // empty buffer and never frees its own.
        assert!(buf.bytes().is_empty());
        assert_eq!(helps.load(Ordering::Relaxed), 0);
        assert!(a.inner.ops.is_closed() && b.inner.ops.is_closed());
    }

    #[test]
    fn a_receive_whose_helper_is_gone_gets_its_buffer_back() {
        // As above, but the fetch can tell that the sender's process is gone.
        let ((_, rs), (buf, rr), (_, b, _)) = ask_unoffered(true);
        assert!(rs.is_err() && rr.is_err());
        assert_eq!(buf.bytes().len(), 40, "the receive buffer came back");
        assert!(b.inner.ops.is_closed());
    }
}
