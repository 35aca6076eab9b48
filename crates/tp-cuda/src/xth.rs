//! cuda_xth: GPU tensors between two pipes of one process, by a device-to-device copy
//! ordered by events.
//!
//! The sender records a *start* event on its stream and parks its buffer with the event
//! (tp-channel's parking lot: only a token crosses the connection, never an address);
//! the receiver makes its stream wait for the start event, enqueues the copy on its
//! stream, records a *stop* event after it and makes the **sender's** stream wait for
//! that, so the sender's later work cannot overwrite the bytes before the copy read
//! them; then it acknowledges (tp-channel's handoff protocol) and the sender gets its
//! buffer back. Nothing waits on the host: both completions are stream-ordered.
//!
//! Descriptor: `cuda_xth:<boot id>:<pid ns>:<pid>` for every GPU, so it is chosen only
//! inside one process. Copies between two GPUs go peer to peer where the hardware
//! allows, through the host otherwise (the driver decides).

use tp_channel::kit::{Fetch, HandoffContext, Ticket, le_bytes, park, with_parked};
use tp_channel::{ChannelError, Device, RecvBuf, SendBuf};
use tp_wire::device::DeviceKind;

use crate::buffer::{CudaBuffer, recv_cuda_sized, send_cuda};
use crate::driver::{self, Event};

/// A parked send: the buffer, and the event recorded after its producer's work (or why
/// it could not be recorded — the receiver then fails the transfer).
struct Parcel {
    buf: Box<dyn SendBuf>,
    start: Result<Event, String>,
}

impl SendBuf for Parcel {
    fn bytes(&self) -> &[u8] {
        &[]
    }

    fn device(&self) -> Device {
        self.buf.device()
    }

    fn byte_len(&self) -> usize {
        self.buf.byte_len()
    }
}

struct EventCopy;

impl Fetch for EventCopy {
    type Held = Ticket;

    fn accepts(&self, device: Device) -> bool {
        device.kind == DeviceKind::Cuda
    }

    fn publish(&self, buf: Box<dyn SendBuf>) -> (Vec<u8>, Ticket) {
        let len = buf.byte_len() as u64;
        let start = match send_cuda(&*buf) {
            Some(b) => Event::new(b.device_index())
                .and_then(|e| e.record(b.stream()).map(|()| e))
                .map_err(|e| e.to_string()),
            None => Err("the buffer is not a CudaBuffer".to_string()),
        };
        let ticket = park(Box::new(Parcel { buf, start }));
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&ticket.token().to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        (d, ticket)
    }

    fn take_back(&self, held: Ticket) -> Box<dyn SendBuf> {
        let parcel: Box<dyn std::any::Any> = held.take_back();
        match parcel.downcast::<Parcel>() {
            Ok(p) => p.buf,
            // Only parcels are parked by this fetch.
            Err(_) => Box::new(Vec::new()),
        }
    }

    fn fetch(&self, d: &[u8], dst: &mut dyn RecvBuf) -> Result<(), ChannelError> {
        if d.len() != 16 {
            return Err(ChannelError::protocol(
                "cuda_xth descriptor is not 16 bytes",
            ));
        }
        let token = u64::from_le_bytes(le_bytes(d, 0)?);
        let len = u64::from_le_bytes(le_bytes(d, 8)?);
        let dst = recv_cuda_sized("cuda_xth", dst, len)?;
        with_parked(token, |parcel| {
            let any: &dyn std::any::Any = parcel;
            let parcel = any
                .downcast_ref::<Parcel>()
                .ok_or_else(|| ChannelError::protocol("cuda_xth: a foreign parked buffer"))?;
            let start = parcel
                .start
                .as_ref()
                .map_err(|why| ChannelError::device("cuda_xth: the sender's event", why))?;
            let src = send_cuda(&*parcel.buf)
                .filter(|s| s.len() == dst.len())
                .ok_or_else(|| ChannelError::protocol("cuda_xth: parked buffer changed"))?;
            copy_ordered(src, dst, start).map_err(ChannelError::from)
        })?
    }
}

/// Enqueues `src → dst` on `dst`'s stream after `start`, and makes `src`'s stream wait
/// for the copy.
fn copy_ordered(
    src: &CudaBuffer,
    dst: &CudaBuffer,
    start: &Event,
) -> Result<(), driver::CudaError> {
    start.wait_on(dst.device_index(), dst.stream())?;
    driver::copy_async(
        dst.device_index(),
        dst.addr(),
        src.addr(),
        dst.len(),
        dst.stream(),
    )?;
    let stop = Event::new(dst.device_index())?;
    stop.record(dst.stream())?;
    stop.wait_on(src.device_index(), src.stream())
}

/// The cuda_xth channel context.
#[derive(Debug)]
pub struct CudaXthContext {
    core: HandoffContext,
}

impl Default for CudaXthContext {
    fn default() -> Self {
        Self::new()
    }
}

impl CudaXthContext {
    /// Probes the driver; the descriptor names this process, one per GPU.
    pub fn new() -> Self {
        let descriptors = (|| {
            let drv = driver::driver()?;
            if let Some(i) = drv.devices.iter().position(|d| !d.unified_addressing) {
                return Err(format!("cuda:{i} lacks unified addressing"));
            }
            let boot = tp_channel::kit::boot_id()?;
            let pidns = tp_channel::kit::namespace("pid")?;
            let d = format!("cuda_xth:{boot}:{pidns}:{}", std::process::id()).into_bytes();
            Ok((0..drv.devices.len())
                .map(|i| (Device::cuda(i as u32), d.clone()))
                .collect())
        })();
        Self {
            core: HandoffContext::with_devices("cuda_xth", descriptors),
        }
    }
}

tp_channel::kit::handoff_channel_context!(CudaXthContext, "cuda_xth", EventCopy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_buffers_are_refused_and_a_forged_token_names_nothing() {
        assert!(!EventCopy.accepts(Device::CPU));
        assert!(EventCopy.accepts(Device::cuda(3)));
        let (d, ticket) = EventCopy.publish(Box::new(vec![1u8; 4]));
        // A CPU destination is refused before any driver call.
        let mut dst = vec![0u8; 4];
        assert!(matches!(
            EventCopy.fetch(&d, &mut dst),
            Err(ChannelError::UnsupportedDevice { .. })
        ));
        assert!(EventCopy.fetch(&d[..8], &mut dst).is_err());
        // The parked CPU buffer comes back intact.
        let back = EventCopy.take_back(ticket);
        assert_eq!(back.bytes(), &[1u8; 4]);
    }
}
