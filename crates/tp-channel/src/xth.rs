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
//!
//! **Help.** Over connections that read by looking (shm), a sender of at least
//! [`HELP_FROM`] bytes offers help (one byte after the token and length): the receiver
//! lends the back half of its buffer under the sender's token (`lend`), asks, and
//! copies the front half while the sender, which would only wait for its
//! acknowledgement otherwise, copies the back half on its own core. The request names
//! the token only; the sender finds the loan by its own token.

use crate::handoff::{Fetch, HandoffContext, Help, le_bytes};
use crate::lend;
use crate::park::{Ticket, park, with_parked};
use crate::{ChannelError, RecvBuf, SendBuf};

/// Tensors from this size offer help (from four times it when sends are queued behind,
/// as cma's do): below it a copy is shorter than the request and answer cost.
pub const HELP_FROM: usize = 256 << 10;

/// A descriptor: token and length, then 1 when the sender offers help.
fn parse(d: &[u8]) -> Result<(u64, u64, bool), ChannelError> {
    let offers = match d.len() {
        16 => false,
        17 if d[16] == 1 => true,
        _ => return Err(ChannelError::protocol("malformed xth descriptor")),
    };
    Ok((
        u64::from_le_bytes(le_bytes(d, 0)?),
        u64::from_le_bytes(le_bytes(d, 8)?),
        offers,
    ))
}

/// A receive buffer's identity while a receive holds it: the address of the buffer
/// object (not of its bytes, which are not touched).
fn owner(buf: &dyn RecvBuf) -> usize {
    std::ptr::from_ref(buf).cast::<()>() as usize
}

/// `Err(LengthMismatch)` unless the descriptor's `len` is the receive buffer's.
fn check_len(len: u64, dst: &[u8]) -> Result<(), ChannelError> {
    if len == dst.len() as u64 {
        Ok(())
    } else {
        Err(ChannelError::LengthMismatch {
            expected: dst.len() as u64,
            announced: len,
        })
    }
}

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
        let (token, len, _) = parse(d)?;
        let dst = dst.bytes_mut();
        check_len(len, dst)?;
        with_parked(token, |src| {
            let src = src.bytes();
            if src.len() != dst.len() {
                return Err(ChannelError::protocol("parked buffer changed"));
            }
            copy(dst, src);
            Ok(())
        })?
    }

    fn offer_help(&self, held: &Ticket, queued: bool, descriptor: &mut Vec<u8>) -> bool {
        let len = held.with_bytes(|b| b.bytes().len()).unwrap_or(0);
        let worth = if queued {
            len / 4 >= HELP_FROM
        } else {
            len >= HELP_FROM
        };
        let offer = worth && descriptor.len() == 16;
        if offer {
            descriptor.push(1);
        }
        offer
    }

    #[allow(unsafe_code)]
    fn ask_help(&self, d: &[u8], buf: &mut dyn RecvBuf) -> Result<Option<Help>, ChannelError> {
        let (token, len, offers) = parse(d)?;
        let owner = owner(buf);
        let dst = buf.bytes_mut();
        check_len(len, dst)?;
        // Cache-line aligned, so the two cores never write one line.
        let from = (dst.len() / 2) & !63;
        if !offers || from == 0 {
            return Ok(None);
        }
        // SAFETY: the receive buffer stays in place until the sender's answer or until
        // the receive gives up waiting — both end the loan first (`help_answered`,
        // `helper_gone`) — or else it is leaked; meanwhile this fetch reaches its
        // front part only through the loan (`fetch_part`), the sender its back part.
        if !unsafe { lend::lend(token, dst.as_mut_ptr(), dst.len(), from, owner) } {
            return Ok(None);
        }
        Ok(Some(Help {
            from,
            request: token.to_le_bytes().to_vec(),
        }))
    }

    fn fetch_part(
        &self,
        d: &[u8],
        dst: &mut dyn RecvBuf,
        range: std::ops::Range<usize>,
    ) -> Result<(), ChannelError> {
        let (token, _, _) = parse(d)?;
        let fill = |dst: &mut [u8]| {
            let dst = dst
                .get_mut(range.clone())
                .ok_or_else(|| ChannelError::protocol("a part past the tensor's end"))?;
            with_parked(token, |src| {
                let src = src
                    .bytes()
                    .get(range.clone())
                    .ok_or_else(|| ChannelError::protocol("a part past the parked buffer's end"))?;
                copy_from(dst, src, HALF_PARALLEL_FROM);
                Ok(())
            })?
        };
        // While the sender may be writing the back part, our front part is reached
        // through the loan only; after its answer (the loan ended), through the buffer.
        match lend::with_front(token, owner(dst), fill) {
            Some(r) => r,
            None => fill(dst.bytes_mut()),
        }
    }

    fn help_answered(&self, d: &[u8]) {
        if let Ok((token, _, _)) = parse(d) {
            lend::revoke(token);
        }
    }

    fn helper_gone(&self, d: &[u8]) -> bool {
        // Once the loan is revoked the sender cannot write into the buffer any more.
        if let Ok((token, _, _)) = parse(d) {
            lend::revoke(token);
        }
        true
    }

    fn help(&self, held: &Ticket, request: &[u8]) -> Result<(), ChannelError> {
        if request != held.token().to_le_bytes() {
            return Err(ChannelError::protocol(
                "an xth help request for another buffer",
            ));
        }
        let copied = held.with_bytes(|src| {
            lend::with_lent(held.token(), |dst| {
                let src = src.bytes();
                let tail = src
                    .len()
                    .checked_sub(dst.len())
                    .and_then(|from| src.get(from..));
                tail.map(|t| copy_from(dst, t, HALF_PARALLEL_FROM))
                    .is_some()
            })
        });
        match copied {
            Some(Some(true)) => Ok(()),
            _ => Err(ChannelError::protocol(
                "nothing lent for this xth help request",
            )),
        }
    }
}

/// Copies from this size up are split across threads.
const PARALLEL_FROM: usize = 2 << 20;
/// A helped tensor's halves are split across threads from this size: the two ends'
/// cores already copy at once.
const HALF_PARALLEL_FROM: usize = 8 << 20;
/// The piece of a large copy one thread takes at a time.
const PIECE: usize = 256 << 10;

/// `dst.copy_from_slice(src)`, split for large tensors into pieces that this thread
/// and up to three of the process's copy helpers take in turn (`split`): one thread's
/// `memcpy` of page-aligned buffers runs at a fraction of the machine's bandwidth here
/// (4K aliasing between source and destination; BENCHMARKS.md), and the sender's
/// thread is idle meanwhile.
fn copy(dst: &mut [u8], src: &[u8]) {
    copy_from(dst, src, PARALLEL_FROM);
}

/// [`copy`], split from `parallel_from` bytes.
fn copy_from(dst: &mut [u8], src: &[u8], parallel_from: usize) {
    if dst.len() < parallel_from || dst.len() != src.len() {
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

    fn tensor(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// The help exchange, step by step: the sender offers, the receiver lends its tail
    /// and fetches its head, the sender fills the tail — once, and only for its own
    /// token.
    #[test]
    fn a_helping_sender_fills_the_lent_tail_once() {
        let src = tensor(1 << 20);
        let (mut d, ticket) = Memcpy.publish(Box::new(src.clone()));
        assert!(Memcpy.offer_help(&ticket, false, &mut d));
        assert_eq!(d.len(), 17);
        let mut dst: Box<dyn RecvBuf> = Box::new(vec![0u8; 1 << 20]);
        let help = Memcpy.ask_help(&d, &mut *dst).unwrap().unwrap();
        assert_eq!(help.from, 1 << 19);
        let other = (ticket.token() + 1).to_le_bytes();
        assert!(
            Memcpy.help(&ticket, &other).is_err(),
            "another token's request"
        );
        Memcpy.help(&ticket, &help.request).unwrap();
        assert!(
            Memcpy.help(&ticket, &help.request).is_err(),
            "a loan is used once"
        );
        Memcpy.fetch_part(&d, &mut *dst, 0..help.from).unwrap();
        Memcpy.help_answered(&d);
        assert!(dst.bytes() == &src[..]);
        drop(Memcpy.take_back(ticket));
    }

    /// Below `HELP_FROM` nothing is offered, and without an offer nothing is asked; a
    /// loan the receiver took back (the sender gone or answered) is never written.
    #[test]
    fn no_help_below_the_threshold_nor_after_the_loan_ends() {
        let (mut d, small) = Memcpy.publish(Box::new(tensor(HELP_FROM - 1)));
        assert!(!Memcpy.offer_help(&small, false, &mut d));
        assert!(
            Memcpy
                .ask_help(&d, &mut vec![0u8; HELP_FROM - 1])
                .unwrap()
                .is_none()
        );
        // Queued behind other sends, four times the threshold is needed.
        let (mut d, queued) = Memcpy.publish(Box::new(tensor(2 * HELP_FROM)));
        assert!(!Memcpy.offer_help(&queued, true, &mut d));

        let (mut d, big) = Memcpy.publish(Box::new(tensor(HELP_FROM)));
        assert!(Memcpy.offer_help(&big, false, &mut d));
        let mut dst: Box<dyn RecvBuf> = Box::new(vec![0u8; HELP_FROM]);
        let help = Memcpy.ask_help(&d, &mut *dst).unwrap().unwrap();
        assert!(Memcpy.helper_gone(&d));
        assert!(Memcpy.help(&big, &help.request).is_err(), "the loan ended");
        assert!(dst.bytes()[help.from..].iter().all(|&b| b == 0));
        // A descriptor whose offer byte is anything but 1 is malformed.
        let mut bad = d.clone();
        bad[16] = 7;
        assert!(Memcpy.fetch(&bad, &mut *dst).is_err());
    }
}
