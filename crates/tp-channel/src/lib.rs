//! tp-channel: tensor channels for tp's pipes.
//!
//! A pipe moves a message's tensors over *channels*, one chosen per (sender device,
//! receiver device) pair during the handshake; a channel instance runs over the transport
//! connections the pipe opens for it. This crate holds the two traits every channel
//! implements and the CPU channels:
//!
//! | channel | feature | moves bytes by | descriptor (who can talk) |
//! |---|---|---|---|
//! | [`basic`] | `basic` | the pipe's transport connection | anyone: `any` |
//! | [`xth`] | `xth` | a `memcpy`, same process | `xth:<boot id>:<pid ns>:<pid>` |
//! | [`cma`] | `cma` | `process_vm_readv`, the receiver pulls (the sender pushes half of large tensors) | `cma:<boot id>:<pid ns>:<user ns>:<uid>:<gid>[:<caps>]` |
//! | [`mpt`] | `mpt` | N TCP lanes, each tensor striped across them (above 1 MiB by one thread per lane) | `mpt:<N>:tcp:*` |
//!
//! # The API
//!
//! [`ChannelContext`] is the factory: name, viability with a reason, one descriptor per
//! device, whether a remote descriptor is compatible, how many connections a channel
//! needs, and [`ChannelContext::create_channel`] over those connections.
//!
//! A [`Channel`] sends and receives whole tensors. Both ends know every length (the
//! pipe's descriptor carries it), so the two sides' calls pair up in order: the n-th
//! `send` on one end with the n-th `recv` on the other. Buffers are **handed over**: an
//! operation owns its buffer while in flight and returns it with the result, so a
//! channel may give the buffer's address to the peer (cma) without borrowing across
//! polls. Operations queue when issued (when the method is called), complete in issue
//! order per direction, and each completes exactly once — with an error after
//! [`Channel::close`] or a failure of the connections. Zero-length tensors complete at
//! once on both ends without traffic.
//!
//! Every future here is plain: it works under any executor, with I/O readiness from
//! `async-io`.
#![deny(unsafe_code)]
// Helpers shared by the channels idle when a feature set leaves some (or all) out.
#![cfg_attr(
    not(all(feature = "basic", feature = "xth", feature = "cma", feature = "mpt")),
    allow(dead_code)
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "basic")]
pub mod basic;
mod buf;
mod children;
#[cfg(feature = "cma")]
pub mod cma;
mod error;
mod handoff;
#[cfg(feature = "xth")]
#[allow(unsafe_code)]
mod lend;
#[cfg(feature = "mpt")]
pub mod mpt;
mod ops;
mod park;
#[allow(unsafe_code)]
mod split;
mod system;
#[cfg(feature = "xth")]
pub mod xth;

/// Building blocks for channels, also those outside this crate (`tp-cuda`'s use them):
/// the per-direction operation order, the registry a context closes its channels by,
/// the *handoff* protocol (the sender says where its bytes are, the receiver fetches
/// them and acknowledges), and facts for descriptors.
pub mod kit {
    pub use crate::children::{Children, Close};
    pub use crate::handoff::{Fetch, HandoffChannel, HandoffContext, Help, le_bytes};
    pub use crate::ops::Ops;
    pub use crate::park::{Ticket, park, with_parked};
    pub use crate::system::{boot_id, namespace};

    #[doc(hidden)]
    pub use futures::future::BoxFuture;
    #[doc(hidden)]
    pub use tp_transport::BoxConnection;

    /// Implements [`ChannelContext`](crate::ChannelContext) for a context whose
    /// channels run the handoff protocol: the type has a field `core:`
    /// [`HandoffContext`], and `fetch` (or `|this| fetch`, given the context) makes
    /// each new channel's [`Fetch`]. Name, viability, descriptors, the two connections, channel
    /// creation and close all come from `core`.
    #[macro_export]
    macro_rules! handoff_channel_context {
        ($ty:ty, $name:literal, |$this:ident| $fetch:expr) => {
            impl $crate::ChannelContext for $ty {
                fn name(&self) -> &'static str {
                    $name
                }

                fn viability(&self) -> Result<(), $crate::ChannelError> {
                    self.core.viability()
                }

                fn device_descriptors(&self) -> Vec<($crate::Device, Vec<u8>)> {
                    self.core.device_descriptors()
                }

                fn connections_needed(&self) -> usize {
                    2
                }

                fn create_channel(
                    &self,
                    conns: Vec<$crate::kit::BoxConnection>,
                    _endpoint: $crate::Endpoint,
                ) -> $crate::kit::BoxFuture<'static, Result<$crate::BoxChannel, $crate::ChannelError>>
                {
                    let $this = self;
                    self.core.create($fetch, conns)
                }

                fn close(&self) {
                    self.core.close();
                }
            }
        };
        ($ty:ty, $name:literal, $fetch:expr) => {
            $crate::handoff_channel_context!($ty, $name, |_this| $fetch);
        };
    }
    pub use handoff_channel_context;
}

use std::fmt;

use futures::future::BoxFuture;
use tp_transport::BoxConnection;
pub use tp_wire::Device;
pub use tp_wire::pipe::Endpoint;

pub use buf::{RecvBuf, SendBuf};
pub use error::ChannelError;

/// A boxed channel.
pub type BoxChannel = Box<dyn Channel>;

/// What a send completes with: the buffer, handed back, and the result.
pub type SendDone = (Box<dyn SendBuf>, Result<(), ChannelError>);
/// What a receive completes with: the buffer, handed back (filled on success), and the
/// result.
pub type RecvDone = (Box<dyn RecvBuf>, Result<(), ChannelError>);

/// A channel context: the factory for channels of one kind.
pub trait ChannelContext: fmt::Debug + Send + Sync {
    /// The registered name (`basic`, `xth`, `cma`, `mpt`).
    fn name(&self) -> &'static str;

    /// `Ok` when the channel works here, else [`ChannelError::NotViable`] with the reason.
    ///
    /// # Errors
    /// [`ChannelError::NotViable`].
    fn viability(&self) -> Result<(), ChannelError>;

    /// Returns `true` when [`ChannelContext::viability`] is `Ok`.
    fn is_viable(&self) -> bool {
        self.viability().is_ok()
    }

    /// One descriptor per device whose memory this channel moves; empty when not viable.
    fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)>;

    /// Whether a channel between a local device with descriptor `local` and a remote one
    /// with descriptor `remote` works. Symmetric; byte equality by default.
    fn can_communicate_with_remote(&self, local: &[u8], remote: &[u8]) -> bool {
        local == remote
    }

    /// Transport connections one channel needs.
    fn connections_needed(&self) -> usize;

    /// Creates a channel over `conns` (exactly [`ChannelContext::connections_needed`],
    /// in the order both ends agree on). Resolves once the channel is set up.
    fn create_channel(
        &self,
        conns: Vec<BoxConnection>,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>>;

    /// Closes the context: channels it made are closed. Idempotent.
    fn close(&self);
}

/// Moves tensors between two ends. See the [crate docs](crate) for the rules.
pub trait Channel: fmt::Debug + Send + Sync {
    /// Sends `buf`'s bytes to the peer's matching [`Channel::recv`]. Completes once the
    /// peer no longer needs the buffer, and hands it back.
    fn send(&self, buf: Box<dyn SendBuf>) -> BoxFuture<'static, SendDone>;

    /// Receives the peer's matching send into `buf` (its length must equal the send's),
    /// and hands it back.
    fn recv(&self, buf: Box<dyn RecvBuf>) -> BoxFuture<'static, RecvDone>;

    /// Closes the channel and its connections: pending and later operations complete
    /// with [`ChannelError::Closed`]. Idempotent.
    fn close(&self);
}
