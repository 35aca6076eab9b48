//! What the `tp` tool's pipe and channel peers share: the echo loop, getting the
//! tool's buffers back from the channel traits, and the byte pattern every check
//! compares against.

use std::time::Duration;

use tp_agent::{Allocation, Message, Payload, Pipe, Tensor};
use tp_channel::{Device, RecvBuf, SendBuf};
use tp_wire::packet::Descriptor;

/// The metadata of the message that ends an echo.
pub(crate) const BYE: &[u8] = b"bye";

/// Bytes that differ with position and seed (so a shifted or stale buffer shows).
pub(crate) fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

/// The tool hands channels and pipes only its own buffers (`Vec<u8>`s, and GPU buffers
/// from [`crate::gpu`]); this gets one back to send it.
pub(crate) fn into_send(b: Box<dyn RecvBuf>) -> Box<dyn SendBuf> {
    crate::gpu::to_send(b)
}

/// The other way round.
pub(crate) fn into_recv(b: Box<dyn SendBuf>) -> Box<dyn RecvBuf> {
    crate::gpu::to_recv(b)
}

/// `spare` if its buffers have exactly the lengths and devices `descriptor` asks for (a
/// benchmark reuses its buffers, as the original's does), else fresh ones: each tensor
/// on its target device (the CPU when the writer named none).
pub(crate) fn reuse(
    spare: Option<Allocation>,
    descriptor: &Descriptor,
) -> Result<Allocation, String> {
    match spare {
        Some(a)
            if a.payloads.len() == descriptor.payloads.len()
                && a.tensors.len() == descriptor.tensors.len()
                && a.payloads
                    .iter()
                    .zip(&descriptor.payloads)
                    .all(|(b, p)| b.len() as u64 == p.length)
                && a.tensors.iter().zip(&descriptor.tensors).all(|(b, t)| {
                    b.byte_len() as u64 == t.length
                        && b.device() == t.target_device.unwrap_or(Device::CPU)
                }) =>
        {
            Ok(a)
        }
        _ => Allocation::with_tensors(descriptor, |t, len| {
            crate::gpu::recv_buf(t.target_device.unwrap_or(Device::CPU), len)
        }),
    }
}

/// Reads every message and writes it back, until a message with [`BYE`] as metadata
/// arrives or the pipe fails (the peer closed it). The buffers of one echo are read
/// into again by the next when the shapes match, and the lists that carry them are
/// kept too: an echo of a message shaped like the last allocates nothing.
pub(crate) async fn echo(pipe: &Pipe) {
    let mut spare: Option<Allocation> = None;
    // The reply's payload list and the devices its tensors go back to, kept for their
    // room.
    let mut payloads: Vec<Payload> = Vec::new();
    let mut sources: Vec<Device> = Vec::new();
    loop {
        let Ok(incoming) = pipe.read_descriptor().await else {
            return;
        };
        let d = &incoming.descriptor;
        if d.metadata == BYE {
            // Give the goodbye's writer a moment to see its write complete.
            async_io::Timer::after(Duration::from_millis(50)).await;
            return;
        }
        let metadata = d.metadata.clone();
        payloads.clear();
        payloads.extend(d.payloads.iter().map(|p| Payload {
            data: Vec::new(),
            metadata: p.metadata.clone(),
        }));
        // Each tensor goes back to the device it came from.
        sources.clear();
        sources.extend(d.tensors.iter().map(|t| t.source_device));
        let Ok(alloc) = reuse(spare.take(), d) else {
            return;
        };
        let (mut alloc, r) = pipe.read(incoming, alloc).await;
        if r.is_err() {
            return;
        }
        for (p, data) in payloads.iter_mut().zip(alloc.payloads.drain(..)) {
            p.data = data;
        }
        let msg = Message {
            metadata,
            payloads: std::mem::take(&mut payloads),
            tensors: alloc
                .tensors
                .drain(..)
                .zip(&sources)
                .map(|(t, &source)| Tensor {
                    data: into_send(t),
                    target_device: Some(source),
                    metadata: Vec::new(),
                })
                .collect(),
        };
        let (mut back, w) = pipe.write(msg).await;
        if w.is_err() {
            return;
        }
        alloc
            .payloads
            .extend(back.payloads.drain(..).map(|p| p.data));
        alloc
            .tensors
            .extend(back.tensors.drain(..).map(|t| into_recv(t.data)));
        payloads = back.payloads;
        spare = Some(alloc);
    }
}
