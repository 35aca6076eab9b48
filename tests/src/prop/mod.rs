mod cma;
mod cuda_basic;
mod cuda_gdr;
mod cuda_ipc;
mod packets;
mod pipe;
