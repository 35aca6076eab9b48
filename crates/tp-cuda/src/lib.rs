//! tp-cuda: CUDA channels for tp's pipes (step 7 of the roadmap).
//!
//! **Status: not implemented yet.** This crate holds no code so far; nothing here works.
//! The plan: a CUDA buffer type (device pointer, length, stream) and the channels
//! `cuda_basic` (staging through pinned host memory), `cuda_xth` (same process),
//! `cuda_ipc` (IPC handles and events between processes) and `cuda_gdr` (GPUDirect RDMA),
//! using `cudarc` with dynamic loading so that a machine without a driver builds and
//! reports the channels as not viable instead of panicking.
#![forbid(unsafe_code)]
