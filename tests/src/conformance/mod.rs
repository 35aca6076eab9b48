mod channel;
mod store;
mod transport;
