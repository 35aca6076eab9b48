//! xth: tensors between two pipes of one process, by `memcpy`.
//!
//! The sender parks its buffer in a process-wide registry and sends the receiver a
//! token; the receiver copies straight from the parked buffer into its own and
//! acknowledges; the sender takes its buffer back (the protocol is in `handoff`). No
//! raw address crosses the connection, so a confused or hostile peer can name only a
//! buffer that is parked right now, with its length checked — never arbitrary memory.
//!
//! The descriptor `xth:<boot id>:<pid namespace>:<pid>` matches only inside one process.
//! The copy runs on the task that drives the receive.

use crate::handoff::{Fetch, HandoffContext, le_bytes};
use crate::park::{Ticket, park, with_parked};
use crate::{ChannelError, RecvBuf, SendBuf};

struct Memcpy;

impl Fetch for Memcpy {
    type Held = Ticket;

    fn publish(&self, buf: Box<dyn SendBuf>) -> (Vec<u8>, Ticket) {
        let len = buf.byte_len() as u64;
        let ticket = park(buf);
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&ticket.token().to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        (d, ticket)
    }

    fn take_back(&self, held: Ticket) -> Box<dyn SendBuf> {
        held.take_back()
    }

    fn fetch(&self, d: &[u8], dst: &mut dyn RecvBuf) -> Result<(), ChannelError> {
        if d.len() != 16 {
            return Err(ChannelError::protocol("xth descriptor is not 16 bytes"));
        }
        let token = u64::from_le_bytes(le_bytes(d, 0)?);
        let len = u64::from_le_bytes(le_bytes(d, 8)?);
        let dst = dst.bytes_mut();
        if len != dst.len() as u64 {
            return Err(ChannelError::LengthMismatch {
                expected: dst.len() as u64,
                announced: len,
            });
        }
        with_parked(token, |src| {
            let src = src.bytes();
            if src.len() != dst.len() {
                return Err(ChannelError::protocol("parked buffer changed"));
            }
            copy(dst, src);
            Ok(())
        })?
    }
}

/// Copies from this size up are split across threads.
const PARALLEL_FROM: usize = 2 << 20;
/// The piece of a large copy one thread takes at a time.
const PIECE: usize = 256 << 10;

/// `dst.copy_from_slice(src)`, split for large tensors into pieces that this thread
/// and up to three of the process's copy helpers take in turn (`split`): one thread's
/// `memcpy` of page-aligned buffers runs at a fraction of the machine's bandwidth here
/// (4K aliasing between source and destination; BENCHMARKS.md), and the sender's
/// thread is idle meanwhile.
fn copy(dst: &mut [u8], src: &[u8]) {
    if dst.len() < PARALLEL_FROM || dst.len() != src.len() {
        dst.copy_from_slice(src);
        return;
    }
    crate::split::for_each_piece(dst, PIECE, 4, &|off, d| {
        if let Some(s) = src.get(off..off + d.len()) {
            d.copy_from_slice(s);
        }
    });
}

/// The xth channel context.
#[derive(Debug)]
pub struct XthContext {
    core: HandoffContext,
}

impl Default for XthContext {
    fn default() -> Self {
        Self::new()
    }
}

impl XthContext {
    /// Creates a context; its descriptor names this process.
    pub fn new() -> Self {
        let descriptor = (|| {
            let boot = crate::system::boot_id()?;
            let pidns = crate::system::namespace("pid")?;
            Ok(format!("xth:{boot}:{pidns}:{}", std::process::id()).into_bytes())
        })();
        Self {
            core: HandoffContext::new("xth", descriptor),
        }
    }
}

crate::handoff_channel_context!(XthContext, "xth", Memcpy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_parked_buffer_of_the_right_length_can_be_fetched() {
        let (d, ticket) = Memcpy.publish(Box::new(vec![5u8; 10]));
        let mut dst = vec![0u8; 10];
        Memcpy.fetch(&d, &mut dst).unwrap();
        assert_eq!(dst, vec![5u8; 10]);
        assert!(matches!(
            Memcpy.fetch(&d, &mut vec![0u8; 9]),
            Err(ChannelError::LengthMismatch { .. })
        ));
        let mut forged = d.clone();
        forged[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Memcpy.fetch(&forged, &mut dst),
            Err(ChannelError::Protocol(_))
        ));
        let back = Memcpy.take_back(ticket);
        assert_eq!(back.bytes(), &[5u8; 10]);
        // Taken back: unparked, so the token no longer resolves.
        assert!(Memcpy.fetch(&d, &mut dst).is_err());
    }
}
