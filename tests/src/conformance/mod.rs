mod channel;
mod cuda_channel;
mod store;
mod transport;
