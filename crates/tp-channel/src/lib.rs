//! tp-channel: tensor channels for tp's pipes (step 3 of the roadmap).
//!
//! **Status: not implemented yet.** This crate holds no code so far; nothing here works.
//! The plan:
//!
//! - `lib.rs`: the channel-context trait (name, `is_viable` with a reason, one descriptor
//!   per device, connections needed, channel creation) and the channel trait (send and
//!   receive owned, address-stable buffers; completions in order, exactly once). A pipe
//!   drives them from the `ChannelOp`s of [`tp_wire`]'s state machine.
//! - `basic`: tensors over one transport connection.
//! - `xth`: same process, a `memcpy`.
//! - `cma`: `process_vm_readv`, the receiver pulls; viability probed for real.
//! - `mpt`: tensors striped across N TCP lanes.
#![forbid(unsafe_code)]
