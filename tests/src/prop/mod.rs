mod cuda_ipc;
mod packets;
mod pipe;
