//! Receive-side allocation: turning a [`DescriptorRepr`] into buffers for the read.
//!
//! A reader gets a descriptor, asks an [`Allocator`] for one buffer per payload and one
//! per tensor, and hands the result to the pipe's `read`. [`validate`] checks that what
//! was allocated matches the descriptor: counts, lengths, and the device a sender
//! imposed. Two allocators ship here: [`HeapAllocator`] (under `alloc`) and
//! [`PoolAllocator`], which carves buffers out of one caller-provided region and needs
//! no heap at all.

use core::fmt;

use heapless::Vec as HVec;

use crate::device::Device;
use crate::packet::{DescriptorRepr, PayloadDesc, TensorDesc};

/// A receive buffer: some bytes on some device.
pub trait Buffer {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// Returns `true` when the buffer has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the bytes live on.
    fn device(&self) -> Device;
}

impl Buffer for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn device(&self) -> Device {
        Device::CPU
    }
}

#[cfg(feature = "alloc")]
impl Buffer for alloc::vec::Vec<u8> {
    fn len(&self) -> usize {
        self.len()
    }

    fn device(&self) -> Device {
        Device::CPU
    }
}

/// Why an allocation failed or does not match its descriptor.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum AllocationError {
    /// The allocator has no room for `len` more bytes.
    OutOfMemory {
        /// Requested length.
        len: u64,
    },
    /// The allocator cannot hold that many buffers.
    TooManyBuffers {
        /// Its capacity.
        capacity: usize,
    },
    /// The allocator cannot place memory on this device.
    UnsupportedDevice(Device),
    /// The number of payload buffers differs from the descriptor.
    PayloadCount {
        /// Payloads in the descriptor.
        expected: usize,
        /// Buffers given.
        actual: usize,
    },
    /// The number of tensor buffers differs from the descriptor.
    TensorCount {
        /// Tensors in the descriptor.
        expected: usize,
        /// Buffers given.
        actual: usize,
    },
    /// A payload buffer's length differs from the descriptor.
    PayloadLength {
        /// Payload index.
        index: usize,
        /// Length in the descriptor.
        expected: u64,
        /// Buffer length.
        actual: u64,
    },
    /// A tensor buffer's length differs from the descriptor.
    TensorLength {
        /// Tensor index.
        index: usize,
        /// Length in the descriptor.
        expected: u64,
        /// Buffer length.
        actual: u64,
    },
    /// A payload buffer is not in host memory (payloads always are).
    PayloadDevice {
        /// Payload index.
        index: usize,
        /// The buffer's device.
        actual: Device,
    },
    /// A tensor buffer is not on the device the sender imposed.
    TensorDevice {
        /// Tensor index.
        index: usize,
        /// The sender's target device.
        expected: Device,
        /// The buffer's device.
        actual: Device,
    },
}

impl fmt::Display for AllocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory { len } => write!(f, "allocator out of memory for {len} bytes"),
            Self::TooManyBuffers { capacity } => {
                write!(f, "allocator holds at most {capacity} buffers")
            }
            Self::UnsupportedDevice(d) => write!(f, "allocator cannot place memory on {d}"),
            Self::PayloadCount { expected, actual } => {
                write!(
                    f,
                    "descriptor has {expected} payloads, allocation has {actual}"
                )
            }
            Self::TensorCount { expected, actual } => {
                write!(
                    f,
                    "descriptor has {expected} tensors, allocation has {actual}"
                )
            }
            Self::PayloadLength {
                index,
                expected,
                actual,
            } => {
                write!(
                    f,
                    "payload {index} is {expected} bytes, its buffer is {actual}"
                )
            }
            Self::TensorLength {
                index,
                expected,
                actual,
            } => {
                write!(
                    f,
                    "tensor {index} is {expected} bytes, its buffer is {actual}"
                )
            }
            Self::PayloadDevice { index, actual } => {
                write!(
                    f,
                    "payload {index} must be in cpu memory, its buffer is on {actual}"
                )
            }
            Self::TensorDevice {
                index,
                expected,
                actual,
            } => write!(
                f,
                "tensor {index} must land on {expected} (the sender's target), its buffer is on {actual}"
            ),
        }
    }
}

impl core::error::Error for AllocationError {}

/// Hands out receive buffers for a message.
pub trait Allocator {
    /// The buffer type produced.
    type Buffer: Buffer;

    /// Allocates the buffer for payload `index`.
    ///
    /// # Errors
    /// An [`AllocationError`] when it cannot.
    fn payload(
        &mut self,
        index: usize,
        desc: &PayloadDesc<'_>,
    ) -> Result<Self::Buffer, AllocationError>;

    /// Allocates the buffer for tensor `index`: on `desc.target_device` when set,
    /// otherwise on a device of the allocator's choosing.
    ///
    /// # Errors
    /// An [`AllocationError`] when it cannot.
    fn tensor(
        &mut self,
        index: usize,
        desc: &TensorDesc<'_>,
    ) -> Result<Self::Buffer, AllocationError>;
}

/// The length of a tensor a host-memory allocator may serve: refused when the sender
/// imposed a device other than the CPU.
fn host_tensor_len(desc: &TensorDesc<'_>) -> Result<u64, AllocationError> {
    match desc.target_device {
        Some(d) if d != Device::CPU => Err(AllocationError::UnsupportedDevice(d)),
        _ => Ok(desc.length),
    }
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Checks that `payloads` and `tensors` fit `desc`: counts, lengths, devices.
///
/// # Errors
/// The first mismatch found, in field order.
pub fn validate<P: Buffer, T: Buffer>(
    desc: &DescriptorRepr<'_>,
    payloads: &[P],
    tensors: &[T],
) -> Result<(), AllocationError> {
    if payloads.len() != desc.payloads.len() {
        return Err(AllocationError::PayloadCount {
            expected: desc.payloads.len(),
            actual: payloads.len(),
        });
    }
    if tensors.len() != desc.tensors.len() {
        return Err(AllocationError::TensorCount {
            expected: desc.tensors.len(),
            actual: tensors.len(),
        });
    }
    for (index, (d, b)) in desc.payloads.iter().zip(payloads).enumerate() {
        if len_u64(b.len()) != d.length {
            return Err(AllocationError::PayloadLength {
                index,
                expected: d.length,
                actual: len_u64(b.len()),
            });
        }
        if b.device() != Device::CPU {
            return Err(AllocationError::PayloadDevice {
                index,
                actual: b.device(),
            });
        }
    }
    for (index, (d, b)) in desc.tensors.iter().zip(tensors).enumerate() {
        if len_u64(b.len()) != d.length {
            return Err(AllocationError::TensorLength {
                index,
                expected: d.length,
                actual: len_u64(b.len()),
            });
        }
        if let Some(expected) = d.target_device
            && expected != b.device()
        {
            return Err(AllocationError::TensorDevice {
                index,
                expected,
                actual: b.device(),
            });
        }
    }
    Ok(())
}

/// Buffers for one message, allocated on the heap.
#[cfg(feature = "alloc")]
#[derive(Debug, Default, Eq, PartialEq)]
pub struct Allocation<B> {
    /// One buffer per payload, in order.
    pub payloads: alloc::vec::Vec<B>,
    /// One buffer per tensor, in order.
    pub tensors: alloc::vec::Vec<B>,
}

#[cfg(feature = "alloc")]
impl<B: Buffer> Allocation<B> {
    /// Allocates every buffer `desc` needs from `allocator`, then validates the result.
    ///
    /// # Errors
    /// The allocator's error, or a mismatch found by [`validate`].
    pub fn new<A: Allocator<Buffer = B>>(
        desc: &DescriptorRepr<'_>,
        allocator: &mut A,
    ) -> Result<Self, AllocationError> {
        let payloads = desc
            .payloads
            .iter()
            .enumerate()
            .map(|(i, p)| allocator.payload(i, &p))
            .collect::<Result<_, _>>()?;
        let tensors = desc
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| allocator.tensor(i, &t))
            .collect::<Result<_, _>>()?;
        let a = Self { payloads, tensors };
        validate(desc, &a.payloads, &a.tensors)?;
        Ok(a)
    }
}

/// Allocates zeroed `Vec<u8>`s in host memory, refusing any length over `max_len`.
///
/// Tensors whose sender imposed a non-CPU target device are refused with
/// [`AllocationError::UnsupportedDevice`].
#[cfg(feature = "alloc")]
#[derive(Clone, Copy, Debug)]
pub struct HeapAllocator {
    /// Largest single buffer it hands out.
    pub max_len: u64,
}

#[cfg(feature = "alloc")]
impl Default for HeapAllocator {
    fn default() -> Self {
        Self { max_len: u64::MAX }
    }
}

#[cfg(feature = "alloc")]
impl HeapAllocator {
    fn alloc(&self, len: u64) -> Result<alloc::vec::Vec<u8>, AllocationError> {
        let n = usize::try_from(len).map_err(|_| AllocationError::OutOfMemory { len })?;
        if len > self.max_len {
            return Err(AllocationError::OutOfMemory { len });
        }
        let mut v = alloc::vec::Vec::new();
        v.try_reserve_exact(n)
            .map_err(|_| AllocationError::OutOfMemory { len })?;
        v.resize(n, 0);
        Ok(v)
    }
}

#[cfg(feature = "alloc")]
impl Allocator for HeapAllocator {
    type Buffer = alloc::vec::Vec<u8>;

    fn payload(
        &mut self,
        _index: usize,
        desc: &PayloadDesc<'_>,
    ) -> Result<Self::Buffer, AllocationError> {
        self.alloc(desc.length)
    }

    fn tensor(
        &mut self,
        _index: usize,
        desc: &TensorDesc<'_>,
    ) -> Result<Self::Buffer, AllocationError> {
        self.alloc(host_tensor_len(desc)?)
    }
}

/// Carves buffers out of one caller-provided region, with no heap: a bump allocator
/// that hands out disjoint `&mut [u8]` slices, so no `unsafe` is needed.
///
/// ```
/// use tp_wire::allocation::{PoolAllocator, PoolAllocation};
/// # use tp_wire::packet::{DescriptorRepr, PayloadDesc, Seq};
/// let mut region = [0u8; 256];
/// let payloads = [PayloadDesc { length: 100, metadata: b"" }];
/// let desc = DescriptorRepr { metadata: b"", payloads: Seq::Slice(&payloads), tensors: Seq::Slice(&[]) };
/// let mut pool = PoolAllocator::new(&mut region);
/// let a: PoolAllocation<'_, 4> = pool.allocate(&desc)?;
/// assert_eq!(a.payloads[0].len(), 100);
/// assert_eq!(pool.remaining(), 156);
/// # Ok::<(), tp_wire::allocation::AllocationError>(())
/// ```
#[derive(Debug)]
pub struct PoolAllocator<'r> {
    free: &'r mut [u8],
}

/// Buffers for one message from a [`PoolAllocator`], at most `N` of each kind.
#[derive(Debug)]
pub struct PoolAllocation<'r, const N: usize> {
    /// One buffer per payload.
    pub payloads: HVec<&'r mut [u8], N>,
    /// One buffer per tensor.
    pub tensors: HVec<&'r mut [u8], N>,
}

impl<'r> PoolAllocator<'r> {
    /// Creates an allocator over `region`.
    pub const fn new(region: &'r mut [u8]) -> Self {
        Self { free: region }
    }

    /// Bytes not yet handed out.
    pub fn remaining(&self) -> usize {
        <[u8]>::len(self.free)
    }

    fn take(&mut self, len: u64) -> Result<&'r mut [u8], AllocationError> {
        let n = usize::try_from(len).map_err(|_| AllocationError::OutOfMemory { len })?;
        if n > <[u8]>::len(self.free) {
            return Err(AllocationError::OutOfMemory { len });
        }
        let (head, tail) = core::mem::take(&mut self.free).split_at_mut(n);
        self.free = tail;
        Ok(head)
    }

    /// Allocates every buffer of `desc` (all on the CPU) and validates the result.
    ///
    /// # Errors
    /// [`AllocationError::TooManyBuffers`] past `N` payloads or tensors,
    /// [`AllocationError::OutOfMemory`] when the region is exhausted,
    /// [`AllocationError::UnsupportedDevice`] for a non-CPU target.
    pub fn allocate<const N: usize>(
        &mut self,
        desc: &DescriptorRepr<'_>,
    ) -> Result<PoolAllocation<'r, N>, AllocationError> {
        let mut out = PoolAllocation {
            payloads: HVec::new(),
            tensors: HVec::new(),
        };
        if desc.payloads.len() > N || desc.tensors.len() > N {
            return Err(AllocationError::TooManyBuffers { capacity: N });
        }
        for (i, p) in desc.payloads.iter().enumerate() {
            let b = self.payload(i, &p)?;
            out.payloads
                .push(b)
                .map_err(|_| AllocationError::TooManyBuffers { capacity: N })?;
        }
        for (i, t) in desc.tensors.iter().enumerate() {
            let b = self.tensor(i, &t)?;
            out.tensors
                .push(b)
                .map_err(|_| AllocationError::TooManyBuffers { capacity: N })?;
        }
        validate(desc, &out.payloads, &out.tensors)?;
        Ok(out)
    }
}

impl<'r> Allocator for PoolAllocator<'r> {
    type Buffer = &'r mut [u8];

    fn payload(
        &mut self,
        _index: usize,
        desc: &PayloadDesc<'_>,
    ) -> Result<Self::Buffer, AllocationError> {
        self.take(desc.length)
    }

    fn tensor(
        &mut self,
        _index: usize,
        desc: &TensorDesc<'_>,
    ) -> Result<Self::Buffer, AllocationError> {
        self.take(host_tensor_len(desc)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Seq;

    fn desc<'a>(p: &'a [PayloadDesc<'a>], t: &'a [TensorDesc<'a>]) -> DescriptorRepr<'a> {
        DescriptorRepr {
            metadata: b"",
            payloads: Seq::Slice(p),
            tensors: Seq::Slice(t),
        }
    }

    #[test]
    fn pool_out_of_memory_leaves_region_intact() {
        let mut region = [0u8; 10];
        let mut pool = PoolAllocator::new(&mut region);
        let p = [PayloadDesc {
            length: 11,
            metadata: b"",
        }];
        assert!(matches!(
            pool.allocate::<2>(&desc(&p, &[])),
            Err(AllocationError::OutOfMemory { len: 11 })
        ));
        assert_eq!(pool.remaining(), 10);
    }

    #[test]
    fn pool_too_many_buffers_rejected() {
        let mut region = [0u8; 10];
        let mut pool = PoolAllocator::new(&mut region);
        let p = [PayloadDesc {
            length: 1,
            metadata: b"",
        }; 3];
        assert_eq!(
            pool.allocate::<2>(&desc(&p, &[])).unwrap_err(),
            AllocationError::TooManyBuffers { capacity: 2 }
        );
    }

    #[test]
    fn validate_reports_each_mismatch() {
        let t = [TensorDesc {
            length: 4,
            source_device: Device::CPU,
            target_device: Some(Device::cuda(0)),
            metadata: b"",
        }];
        let d = desc(&[], &t);
        let mut a = [0u8; 4];
        let mut b = [0u8; 3];
        let none: [&mut [u8]; 0] = [];
        assert_eq!(
            validate(&d, &none, &[&mut b[..]]),
            Err(AllocationError::TensorLength {
                index: 0,
                expected: 4,
                actual: 3
            })
        );
        assert_eq!(
            validate(&d, &none, &[&mut a[..]]),
            Err(AllocationError::TensorDevice {
                index: 0,
                expected: Device::cuda(0),
                actual: Device::CPU
            })
        );
        let mut c = [0u8; 1];
        assert_eq!(
            validate::<_, &mut [u8]>(&d, &[&mut c[..]], &[]),
            Err(AllocationError::PayloadCount {
                expected: 0,
                actual: 1
            })
        );
    }

    #[test]
    fn heap_allocator_refuses_cuda_target_and_huge_lengths() {
        let t = [TensorDesc {
            length: 4,
            source_device: Device::CPU,
            target_device: Some(Device::cuda(1)),
            metadata: b"",
        }];
        assert_eq!(
            Allocation::new(&desc(&[], &t), &mut HeapAllocator::default()).unwrap_err(),
            AllocationError::UnsupportedDevice(Device::cuda(1))
        );
        let p = [PayloadDesc {
            length: 1 << 20,
            metadata: b"",
        }];
        assert_eq!(
            Allocation::new(&desc(&p, &[]), &mut HeapAllocator { max_len: 1024 }).unwrap_err(),
            AllocationError::OutOfMemory { len: 1 << 20 }
        );
    }
}
