//! basic: tensors as raw bytes on the pipe's own transport connection.
//!
//! A send writes the tensor's bytes; the matching receive reads exactly that many
//! straight into its buffer (both ends know the length). Works between any two
//! contexts: its descriptor is `any`. One connection.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tp_transport::BoxConnection;

use crate::children::{Children, Close};
use crate::ops::Ops;
use crate::{
    BoxChannel, Channel, ChannelContext, ChannelError, Device, Endpoint, RecvBuf, RecvDone,
    SendBuf, SendDone,
};

/// The basic channel context.
#[derive(Debug, Default)]
pub struct BasicContext {
    children: Arc<Children>,
}

impl BasicContext {
    /// Creates a context.
    pub fn new() -> Self {
        Self::default()
    }
}

impl ChannelContext for BasicContext {
    fn name(&self) -> &'static str {
        "basic"
    }

    fn viability(&self) -> Result<(), ChannelError> {
        Ok(())
    }

    fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
        vec![(Device::CPU, b"any".to_vec())]
    }

    fn connections_needed(&self) -> usize {
        1
    }

    fn create_channel(
        &self,
        conns: Vec<BoxConnection>,
        _endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
        let children = self.children.clone();
        async move {
            if children.is_closed() {
                return Err(ChannelError::Closed);
            }
            let [conn]: [BoxConnection; 1] = conns.try_into().map_err(|c: Vec<_>| {
                ChannelError::protocol(format!("basic needs 1 connection, got {}", c.len()))
            })?;
            let inner = Arc::new(Inner {
                conn,
                ops: Ops::default(),
            });
            children.adopt(Arc::downgrade(&inner) as std::sync::Weak<dyn Close>);
            Ok(Box::new(BasicChannel { inner }) as BoxChannel)
        }
        .boxed()
    }

    fn close(&self) {
        self.children.close_all();
    }
}

struct Inner {
    conn: BoxConnection,
    ops: Ops,
}

impl Close for Inner {
    fn close(&self) {
        if self.ops.mark_closed() {
            self.conn.close();
        }
    }
}

/// A basic channel.
struct BasicChannel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BasicChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicChannel")
            .field("closed", &self.inner.ops.is_closed())
            .finish()
    }
}

impl Channel for BasicChannel {
    fn send(&self, buf: Box<dyn SendBuf>) -> BoxFuture<'static, SendDone> {
        let turn = self.inner.ops.send_turn();
        let inner = self.inner.clone();
        async move {
            match inner
                .ops
                .start_host("basic", &*inner, &turn, buf.device(), buf.byte_len())
                .await
            {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            // Queue the write now, in issue order; later sends queue behind it.
            let bufs = [buf.bytes()];
            let write = inner.conn.write(&bufs);
            drop(turn);
            let r = write.await;
            (buf, r.map_err(ChannelError::from))
        }
        .boxed()
    }

    fn recv(&self, mut buf: Box<dyn RecvBuf>) -> BoxFuture<'static, RecvDone> {
        let turn = self.inner.ops.recv_turn();
        let inner = self.inner.clone();
        async move {
            match inner
                .ops
                .start_host("basic", &*inner, &turn, buf.device(), buf.byte_len())
                .await
            {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let r = {
                let read = inner.conn.read_exact(buf.bytes_mut());
                drop(turn);
                read.await
            };
            (buf, r.map_err(ChannelError::from))
        }
        .boxed()
    }

    fn close(&self) {
        Close::close(&*self.inner);
    }
}

impl Drop for BasicChannel {
    fn drop(&mut self) {
        Close::close(&*self.inner);
    }
}
