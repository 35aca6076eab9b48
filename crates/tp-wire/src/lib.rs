//! tp-wire: the runtime-agnostic core of tp.
//!
//! tp moves messages — CPU payloads plus tensors on CPU or GPU — between processes.
//! This crate holds everything about that which needs no operating system: the wire
//! format, descriptors, receive-side allocation and the pipe protocol as a sans-IO
//! state machine. It has no sockets, threads, clocks or randomness: the layers above
//! (tp-transport, tp-channel, tp-agent) do the I/O and feed the results in.
//!
//! # Layers
//!
//! - [`codec`]: bounded little-endian field readers and writers.
//! - [`frame`]: the 12-byte frame header (magic, version, kind, flags, body length),
//!   declared with zerocopy.
//! - [`packet`]: every packet of the pipe protocol as a zero-copy view (`*Repr<'a>`) and,
//!   under `alloc`, an owned value.
//! - [`allocation`]: [`Allocator`](allocation::Allocator), a heap and a pool allocator,
//!   and [`validate`](allocation::validate) for allocations against descriptors.
//! - [`pipe`] (`alloc`): the handshake, transport and channel negotiation, and message
//!   sequencing, as a state machine driven through `handle_*` inputs and `poll_*` outputs.
//! - [`rpc`]: the RPC agent's framing of calls and replies in pipe messages.
//! - [`testing`] (`testing`): a deterministic two-endpoint harness.
//!
//! # Validation contract
//!
//! Every length and count read from the wire is checked against [`Limits`] and against
//! the bytes actually present before anything is sliced or allocated. Decoding never
//! panics; a view allocates nothing; the owned forms allocate only what the parsed
//! bytes hold. Bad input yields a typed [`DecodeError`]; the pipe turns it into a
//! [`pipe::PipeError`] and closes.
//!
//! # Features
//!
//! - `std` (default): implies `alloc`.
//! - `alloc`: owned packets, [`allocation::HeapAllocator`], the [`pipe`] state machine.
//! - `testing`: the [`testing`] harness.
//!
//! With no features the crate builds for bare-metal targets (`thumbv7em-none-eabihf`).
//!
//! # Example
//!
//! ```
//! use tp_wire::packet::{emit_frame, frame_len, parse_frame, DescriptorRepr, PayloadDesc, Seq};
//! use tp_wire::Limits;
//!
//! let payloads = [PayloadDesc { length: 5, metadata: b"meta" }];
//! let desc = DescriptorRepr { metadata: b"hello", payloads: Seq::Slice(&payloads), tensors: Seq::Slice(&[]) };
//! let mut buf = [0u8; 128];
//! let n = emit_frame(&desc, &mut buf)?;
//! assert_eq!(n, frame_len(&desc));
//! let back: DescriptorRepr<'_> = parse_frame(&buf[..n], &Limits::DEFAULT)?;
//! assert_eq!(back, desc);
//! assert_eq!(back.payloads.iter().next().unwrap().metadata, b"meta"); // borrowed from buf
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(
    clippy::std_instead_of_core,
    clippy::std_instead_of_alloc,
    clippy::alloc_instead_of_core,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod allocation;
pub mod codec;
pub mod device;
pub mod error;
pub mod frame;
pub mod limits;
pub mod packet;
#[cfg(feature = "alloc")]
pub mod pipe;
pub mod rpc;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;

pub use device::{Device, DeviceKind};
pub use error::{DecodeError, EncodeError, Limit};
pub use limits::Limits;
pub use time::Instant;
