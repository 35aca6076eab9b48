mod packets;
mod pipe;
