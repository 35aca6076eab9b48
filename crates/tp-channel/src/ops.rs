//! What every channel's operations share: a FIFO turn per direction and the closed
//! flag, and the common start of an operation.

use std::sync::atomic::{AtomicBool, Ordering};

use tp_transport::order::{Order, Turn};

use crate::ChannelError;

#[derive(Debug, Default)]
pub(crate) struct Ops {
    sends: Order,
    recvs: Order,
    closed: AtomicBool,
}

impl Ops {
    /// A send's place in line, taken when the send is issued.
    pub(crate) fn send_turn(&self) -> Turn {
        self.sends.turn()
    }

    /// A receive's place in line, taken when the receive is issued.
    pub(crate) fn recv_turn(&self) -> Turn {
        self.recvs.turn()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the channel closed; `true` the first time (the caller then closes its
    /// connections).
    pub(crate) fn mark_closed(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn check(&self) -> Result<(), ChannelError> {
        if self.is_closed() {
            Err(ChannelError::Closed)
        } else {
            Ok(())
        }
    }

    /// Starts an operation on `len` bytes: a zero-length one is done at once (both ends
    /// know the length, nothing crosses); any other waits for its turn and checks that
    /// the channel is open. `Ok(true)`: go on with the I/O.
    pub(crate) async fn start(&self, turn: &Turn, len: usize) -> Result<bool, ChannelError> {
        if len == 0 {
            return self.check().map(|()| false);
        }
        turn.ready().await;
        self.check()?;
        Ok(true)
    }
}
