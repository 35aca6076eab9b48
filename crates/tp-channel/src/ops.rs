//! What every channel's operations share: a FIFO turn per direction and the closed
//! flag, and the common start of an operation.

use std::sync::atomic::{AtomicBool, Ordering};

use tp_transport::order::{Order, Turn};

use crate::children::Close;
use crate::{ChannelError, Device};

/// A channel's operation bookkeeping: one FIFO line per direction and the closed flag.
#[derive(Debug, Default)]
pub struct Ops {
    sends: Order,
    recvs: Order,
    closed: AtomicBool,
}

impl Ops {
    /// A send's place in line, taken when the send is issued.
    pub fn send_turn(&self) -> Turn {
        self.sends.turn()
    }

    /// A receive's place in line, taken when the receive is issued.
    pub fn recv_turn(&self) -> Turn {
        self.recvs.turn()
    }

    /// Whether the channel was closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the channel closed; `true` the first time (the caller then closes its
    /// connections).
    pub fn mark_closed(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    /// `Err(Closed)` once the channel was closed.
    ///
    /// # Errors
    /// [`ChannelError::Closed`].
    pub fn check(&self) -> Result<(), ChannelError> {
        if self.is_closed() {
            Err(ChannelError::Closed)
        } else {
            Ok(())
        }
    }

    /// [`Ops::start`] for a channel that moves host memory only: a buffer on another
    /// device is refused with [`ChannelError::UnsupportedDevice`] and the channel closed
    /// through `channel_close` (the peer's matching operation can no longer pair up).
    pub async fn start_host(
        &self,
        channel: &'static str,
        channel_close: &dyn Close,
        turn: &Turn,
        device: Device,
        len: usize,
    ) -> Result<bool, ChannelError> {
        if device != Device::CPU {
            channel_close.close();
            return Err(ChannelError::UnsupportedDevice { channel, device });
        }
        self.start(turn, len).await
    }

    /// Starts an operation on `len` bytes: a zero-length one is done at once (both ends
    /// know the length, nothing crosses); any other waits for its turn and checks that
    /// the channel is open. `Ok(true)`: go on with the I/O.
    pub async fn start(&self, turn: &Turn, len: usize) -> Result<bool, ChannelError> {
        if len == 0 {
            return self.check().map(|()| false);
        }
        turn.ready().await;
        self.check()?;
        Ok(true)
    }
}
