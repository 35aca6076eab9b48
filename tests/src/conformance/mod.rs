mod channel;
mod transport;
