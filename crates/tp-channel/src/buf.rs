//! The buffers channels take over while an operation is in flight.
//!
//! A buffer's bytes must stay where they are while a channel holds it, even though the
//! box itself moves: heap-backed types (`Vec<u8>`, `Box<[u8]>`, `Arc<[u8]>`) do. The cma
//! channel hands the address of a send buffer to the peer, which reads it with
//! `process_vm_readv`; a type whose bytes moved would make the peer read stale memory
//! (its own problem, never ours: the kernel checks the access).
//!
//! Buffers may also live in device memory (a CUDA buffer from `tp-cuda`): then
//! [`SendBuf::device`] says where, [`SendBuf::byte_len`] how long, and `bytes()` is
//! empty — the host cannot read device memory. CPU channels refuse such buffers; the
//! channel for that device downcasts the buffer to its concrete type.

use std::any::Any;
use std::sync::Arc;

use tp_wire::Device;

/// Bytes to send. Read-only, so one shared tensor (`Arc<[u8]>`) can be sent on many
/// channels at once. A buffer handed back is a `Box<dyn SendBuf>`; upcast it to
/// `Box<dyn Any>` and downcast to get the concrete type back.
pub trait SendBuf: Any + Send + Sync {
    /// The bytes (host memory; empty for a buffer in device memory).
    fn bytes(&self) -> &[u8];

    /// Where the bytes live. Default: the CPU.
    fn device(&self) -> Device {
        Device::CPU
    }

    /// The length in bytes, wherever they live. Default: `bytes().len()`.
    fn byte_len(&self) -> usize {
        self.bytes().len()
    }
}

/// Memory to receive into. Like [`SendBuf`], downcastable through `Box<dyn Any>`.
pub trait RecvBuf: Any + Send {
    /// The bytes to fill.
    fn bytes_mut(&mut self) -> &mut [u8];

    /// The bytes (after a receive, what arrived).
    fn bytes(&self) -> &[u8];

    /// Where the bytes live. Default: the CPU.
    fn device(&self) -> Device {
        Device::CPU
    }

    /// The length in bytes, wherever they live. Default: `bytes().len()`.
    fn byte_len(&self) -> usize {
        self.bytes().len()
    }
}

impl SendBuf for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl SendBuf for Box<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl SendBuf for Arc<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl SendBuf for Arc<Vec<u8>> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl RecvBuf for Vec<u8> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }

    fn bytes(&self) -> &[u8] {
        self
    }
}

impl RecvBuf for Box<[u8]> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }

    fn bytes(&self) -> &[u8] {
        self
    }
}
