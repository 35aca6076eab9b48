//! tp-cuda: CUDA channels for tp's pipes — GPU tensors move without being staged by
//! the user.
//!
//! | channel | moves | between | descriptor (who can talk) |
//! |---|---|---|---|
//! | [`basic::CudaBasicContext`] (`cuda_basic`) | through host memory: slots both processes map and register with the GPU (one machine), else pinned chunks over a CPU channel | any two ends the CPU channel connects; one end may be the CPU | `cuda_basic:<cpu\|cuda>:<CPU channel's>` |
//! | [`xth::CudaXthContext`] (`cuda_xth`) | a device-to-device copy ordered by events | two pipes of one process | `cuda_xth:<boot id>:<pid ns>:<pid>` |
//! | [`ipc::CudaIpcContext`] (`cuda_ipc`) | a device-to-device copy through a staging *outbox* shared by CUDA IPC | two processes of one machine whose GPUs can reach each other | `cuda_ipc:<boot id>:<pid>:<uuid>:<peer uuids>` |
//! | [`gdr::CudaGdrContext`] (`cuda_gdr`) | GPUDirect RDMA | machines with RDMA NICs and NVIDIA's peer-memory module | see [`gdr`] |
//!
//! A tensor in GPU memory is a [`CudaBuffer`]: a device address, a length, the GPU and a
//! stream. Channels respect the stream: a send reads after the work enqueued before it,
//! and a receive's bytes are there for work enqueued after it completes.
//!
//! # Without a GPU
//! libcuda is loaded at run time (cudarc's `dynamic-loading`), so this crate builds
//! and runs everywhere. With no driver, every context reports
//! `is_viable() == false` with the reason, and nothing calls into CUDA (cudarc panics
//! when the library is missing; [`available`] checks first). Tests that need a GPU
//! print `SKIPPED: …` with the reason; `TP_REQUIRE_CUDA=1` turns that into a failure.
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod basic;
mod buffer;
#[allow(unsafe_code)]
mod driver;
pub mod gdr;
pub mod ipc;
pub mod limits;
pub mod xth;

pub use buffer::CudaBuffer;
pub use driver::{CudaError, OwnedStream, RawStream};

/// `Ok(number of GPUs)` when the CUDA driver is installed and sees at least one GPU,
/// else why not.
///
/// # Errors
/// Why CUDA cannot be used here (no libcuda, `cuInit` failed, no GPU).
pub fn available() -> Result<usize, String> {
    driver::driver().map(|d| d.devices.len())
}

/// For tests and tools that need a GPU: `Some(number of GPUs)`, or `None` after
/// printing `SKIPPED: <what>: <why>` — unless `TP_REQUIRE_CUDA=1`, when a missing GPU
/// panics with the reason instead.
///
/// # Panics
/// With `TP_REQUIRE_CUDA=1` and no usable GPU.
pub fn gpus_or_skip(what: &str) -> Option<usize> {
    match available() {
        Ok(n) => Some(n),
        Err(why) if std::env::var("TP_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("{what}: TP_REQUIRE_CUDA=1 but no GPU is usable: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: {what}: no GPU: {why}");
            None
        }
    }
}
