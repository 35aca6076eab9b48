//! The CUDA channel conformance suite (tensorpipe.md §6.4's `CudaChannelTestSuite` plus
//! the common cases), instantiated for every CUDA channel and each placement it
//! serves. Every case needs a GPU: without one it prints `SKIPPED: …` and passes,
//! unless `TP_REQUIRE_CUDA=1`, when it fails.

use std::any::Any;
use std::sync::Arc;

use futures::future::{join, join_all};
use tp_channel::{BoxChannel, ChannelContext, ChannelError, RecvBuf, SendBuf};
use tp_cuda::{CudaBuffer, OwnedStream, RawStream};

use super::channel::{Executor, Make, pair, pattern, run};

/// Where one end's bytes live.
#[derive(Clone, Copy, Debug)]
enum At {
    Cpu,
    Gpu(u32),
}

fn source(at: At, data: &[u8], stream: RawStream) -> Box<dyn SendBuf> {
    match at {
        At::Cpu => Box::new(data.to_vec()),
        At::Gpu(d) => {
            let mut b = CudaBuffer::alloc(d, data.len(), stream).unwrap();
            b.copy_from_host(data).unwrap();
            Box::new(b)
        }
    }
}

fn target(at: At, len: usize, stream: RawStream) -> Box<dyn RecvBuf> {
    match at {
        At::Cpu => Box::new(vec![0u8; len]),
        At::Gpu(d) => {
            let mut b = CudaBuffer::alloc(d, len, stream).unwrap();
            b.fill_async(0).unwrap();
            b.synchronize().unwrap();
            Box::new(b)
        }
    }
}

/// What a received buffer holds (after the work on its stream).
fn contents(buf: Box<dyn RecvBuf>) -> Vec<u8> {
    let any: Box<dyn Any> = buf;
    match any.downcast::<CudaBuffer>() {
        Ok(b) => b.to_host().unwrap(),
        Err(any) => *any.downcast::<Vec<u8>>().unwrap(),
    }
}

async fn transfer(from: &BoxChannel, src: At, to: &BoxChannel, dst: At, data: &[u8]) {
    let s = RawStream::default();
    let ((_, rs), (got, rr)) = join(
        from.send(source(src, data, s)),
        to.recv(target(dst, data.len(), s)),
    )
    .await;
    rs.unwrap();
    rr.unwrap();
    assert!(contents(got) == data, "{} bytes arrived intact", data.len());
}

#[derive(Clone, Copy)]
struct Case {
    make: Make,
    src: At,
    dst: At,
}

async fn device_descriptors(c: Case) {
    let (a, b) = (c.make.ctx(), c.make.ctx());
    assert!(!a.device_descriptors().is_empty());
    assert_eq!(a.device_descriptors(), b.device_descriptors());
}

async fn client_to_server(c: Case) {
    let (_cc, cl, _sc, sv) = pair(c.make).await;
    transfer(&cl, c.src, &sv, c.dst, &(0..=255u8).collect::<Vec<_>>()).await;
}

async fn server_to_client(c: Case) {
    let (_cc, cl, _sc, sv) = pair(c.make).await;
    transfer(&sv, c.src, &cl, c.dst, &(0..=255u8).collect::<Vec<_>>()).await;
}

async fn one_byte_and_large(c: Case) {
    let (_cc, cl, _sc, sv) = pair(c.make).await;
    transfer(&cl, c.src, &sv, c.dst, &[0x42]).await;
    // Not a multiple of any chunk or slot size.
    transfer(&cl, c.src, &sv, c.dst, &pattern((64 << 20) + 4097, 3)).await;
}

async fn many_tensors_in_flight(c: Case) {
    let (_cc, cl, _sc, sv) = pair(c.make).await;
    let s = RawStream::default();
    let data: Vec<Vec<u8>> = (0..100).map(|i| pattern(256 << 10, i as u8)).collect();
    let sends: Vec<_> = data.iter().map(|d| cl.send(source(c.src, d, s))).collect();
    let recvs: Vec<_> = data
        .iter()
        .map(|d| sv.recv(target(c.dst, d.len(), s)))
        .collect();
    let (sent, got) = join(join_all(sends), join_all(recvs)).await;
    for (i, ((_, rs), (buf, rr))) in sent.into_iter().zip(got).enumerate() {
        rs.unwrap();
        rr.unwrap();
        assert!(contents(buf) == data[i], "tensor {i}");
    }
}

async fn empty_and_nonempty_tensors(c: Case) {
    let (_cc, cl, _sc, sv) = pair(c.make).await;
    for n in [1usize, 0, 1] {
        transfer(&cl, c.src, &sv, c.dst, &vec![7u8; n]).await;
    }
}

/// The sender's stream is busy when it fills the tensor with 0x42 and sends at once:
/// the receiver must see 0x42, not what was there before (`ReceiverWaitsForStartEvent`).
async fn the_receiver_waits_for_the_senders_stream(c: Case) {
    let At::Gpu(d) = c.src else {
        unreachable!("instantiated only with a GPU source")
    };
    let (_cc, cl, _sc, sv) = pair(c.make).await;
    let stream = OwnedStream::new(d).unwrap();
    let len = 1 << 20;
    let mut src = CudaBuffer::alloc(d, len, stream.raw()).unwrap();
    src.fill_async(0).unwrap();
    stream.synchronize().unwrap();
    // Keep the stream busy: fills of a large scratch buffer, then the real fill.
    let mut scratch = CudaBuffer::alloc(d, 256 << 20, stream.raw()).unwrap();
    for _ in 0..20 {
        scratch.fill_async(1).unwrap();
    }
    src.fill_async(0x42).unwrap();
    let dst_stream = OwnedStream::new(match c.dst {
        At::Gpu(e) => e,
        At::Cpu => d,
    })
    .unwrap();
    let ((_, rs), (got, rr)) = join(
        cl.send(Box::new(src)),
        sv.recv(target(c.dst, len, dst_stream.raw())),
    )
    .await;
    rs.unwrap();
    rr.unwrap();
    assert!(contents(got).iter().all(|&b| b == 0x42));
    drop(scratch);
}

/// A tensor that starts inside an allocation (`SendOffsetAllocation`): exactly its
/// bytes move.
async fn an_interior_pointer_sends_its_own_bytes(c: Case) {
    let At::Gpu(d) = c.src else {
        unreachable!("instantiated only with a GPU source")
    };
    let (_cc, cl, _sc, sv) = pair(c.make).await;
    let whole = pattern(4096 + 128, 9);
    let mut base = CudaBuffer::alloc(d, whole.len(), RawStream::default()).unwrap();
    base.copy_from_host(&whole).unwrap();
    // SAFETY: 4096 bytes from offset 128 lie inside `base`, which the owner keeps alive.
    let inner = unsafe {
        CudaBuffer::from_raw(
            base.addr() + 128,
            4096,
            d,
            RawStream::default(),
            Some(Box::new(base)),
        )
    }
    .unwrap();
    let ((_, rs), (got, rr)) = join(
        cl.send(Box::new(inner)),
        sv.recv(target(c.dst, 4096, RawStream::default())),
    )
    .await;
    rs.unwrap();
    rr.unwrap();
    assert!(contents(got) == whole[128..]);
}

async fn close_fails_pending_ops(c: Case) {
    let (_cc, _cl, _sc, sv) = pair(c.make).await;
    let pending: Vec<_> = (0..3)
        .map(|_| sv.recv(target(c.dst, 4096, RawStream::default())))
        .collect();
    sv.close();
    for (_, r) in join_all(pending).await {
        assert!(matches!(r, Err(ChannelError::Closed)), "{r:?}");
    }
}

fn gpus(what: &str) -> Option<usize> {
    tp_cuda::gpus_or_skip(what)
}

macro_rules! cuda_conformance {
    // Every case; the GPU-source ones only where the source is a GPU.
    ($name:ident, $make:expr, At::Gpu($s:expr), $dst:expr, $min_gpus:expr) => {
        cuda_conformance!(@module $name, $make, At::Gpu($s), $dst, $min_gpus;
            the_receiver_waits_for_the_senders_stream,
            an_interior_pointer_sends_its_own_bytes);
    };
    ($name:ident, $make:expr, $src:expr, $dst:expr, $min_gpus:expr) => {
        cuda_conformance!(@module $name, $make, $src, $dst, $min_gpus;);
    };
    (@module $name:ident, $make:expr, $src:expr, $dst:expr, $min_gpus:expr; $($extra:ident),*) => {
        mod $name {
            use super::*;

            const CASE: Case = Case {
                make: Make::tcp($make),
                src: $src,
                dst: $dst,
            };

            cuda_conformance!(@cases $min_gpus;
                device_descriptors, client_to_server, server_to_client, one_byte_and_large,
                many_tensors_in_flight, empty_and_nonempty_tensors, close_fails_pending_ops
                $(, $extra)*);
        }
    };
    (@cases $min_gpus:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let what = concat!(module_path!(), "::", stringify!($case));
                let Some(n) = gpus(what) else { return };
                if n < $min_gpus {
                    eprintln!("SKIPPED: {what}: needs {} GPUs, {n} here", $min_gpus);
                    return;
                }
                // A GPU is not all a channel may need (cuda_gdr: an RDMA NIC).
                if let Err(e) = CASE.make.ctx().viability() {
                    eprintln!("SKIPPED: {what}: {e}");
                    return;
                }
                run(Executor::BlockOn, super::$case(CASE));
            }
        )*
    };
}

fn cuda_basic() -> Arc<dyn ChannelContext> {
    Arc::new(tp_cuda::basic::CudaBasicContext::new(
        Arc::new(tp_channel::basic::BasicContext::new()),
        tp_cuda::basic::CudaBasicConfig::default(),
    ))
}

fn cuda_xth() -> Arc<dyn ChannelContext> {
    Arc::new(tp_cuda::xth::CudaXthContext::new())
}

cuda_conformance!(cuda_basic_gpu_to_gpu, cuda_basic, At::Gpu(0), At::Gpu(0), 1);
cuda_conformance!(cuda_basic_cpu_to_gpu, cuda_basic, At::Cpu, At::Gpu(0), 1);
cuda_conformance!(cuda_basic_gpu_to_cpu, cuda_basic, At::Gpu(0), At::Cpu, 1);
cuda_conformance!(
    cuda_basic_across_gpus,
    cuda_basic,
    At::Gpu(0),
    At::Gpu(1),
    2
);
cuda_conformance!(cuda_xth_gpu_to_gpu, cuda_xth, At::Gpu(0), At::Gpu(0), 1);
cuda_conformance!(cuda_xth_across_gpus, cuda_xth, At::Gpu(1), At::Gpu(0), 2);

fn cuda_gdr() -> Arc<dyn ChannelContext> {
    Arc::new(tp_cuda::gdr::CudaGdrContext::new())
}

cuda_conformance!(cuda_gdr_gpu_to_gpu, cuda_gdr, At::Gpu(0), At::Gpu(0), 1);
cuda_conformance!(cuda_gdr_across_gpus, cuda_gdr, At::Gpu(1), At::Gpu(0), 2);

/// cuda_ipc cannot work inside one process: the descriptors say so
/// (`CannotCommunicateInSameProcess`). Its transfers are tested across two processes by
/// `cuda_ipc_between_two_processes`.
#[test]
fn cuda_ipc_refuses_its_own_process() {
    let Some(_) = gpus("cuda_ipc_refuses_its_own_process") else {
        return;
    };
    let ctx = tp_cuda::ipc::CudaIpcContext::default();
    for (_, d) in ctx.device_descriptors() {
        assert!(!ctx.can_communicate_with_remote(&d, &d));
    }
}

/// cuda_basic never serves CPU ↔ CPU (`CannotCommunicateCpuToCpu`).
#[test]
fn cuda_basic_refuses_cpu_to_cpu() {
    let Some(_) = gpus("cuda_basic_refuses_cpu_to_cpu") else {
        return;
    };
    let ctx = cuda_basic();
    let cpu = ctx
        .device_descriptors()
        .into_iter()
        .find(|(d, _)| *d == tp_channel::Device::CPU)
        .unwrap()
        .1;
    assert!(!ctx.can_communicate_with_remote(&cpu, &cpu));
}

/// Set in the peer process of `cuda_ipc_between_two_processes`: the address to connect to.
const IPC_PEER: &str = "TP_CUDA_IPC_PEER";

/// The tensors `cuda_ipc_between_two_processes` sends, in order; the peer echoes each
/// into a fresh buffer: one whose producer is still running when it is sent, one byte,
/// zero, one that starts inside its allocation, a large one of no particular size, and
/// 20 of 256 KiB for many in flight.
fn ipc_lens() -> Vec<usize> {
    let mut lens = vec![1 << 20, 1, 0, 4096, (64 << 20) + 4097];
    lens.extend([256 << 10; 20]);
    lens
}

/// The peer: connects twice (numbering the connections), then echoes every tensor.
async fn ipc_peer(addr: String) {
    let tcp = tp_transport::tcp::TcpTransport::new();
    let mut conns = Vec::new();
    for i in 0..2u64 {
        let c = tp_transport::Transport::connect(&tcp, &addr).await.unwrap();
        c.write(&[&i.to_le_bytes()]).await.unwrap();
        conns.push(c);
    }
    let ctx = tp_cuda::ipc::CudaIpcContext::default();
    let ch = ctx
        .create_channel(conns, tp_channel::Endpoint::Connect)
        .await
        .unwrap();
    let stream = OwnedStream::new(0).unwrap();
    for len in ipc_lens() {
        let (got, r) = ch.recv(target(At::Gpu(0), len, stream.raw())).await;
        r.unwrap();
        let any: Box<dyn Any> = got;
        let echo: Box<dyn SendBuf> = any.downcast::<CudaBuffer>().unwrap();
        let (_, r) = ch.send(echo).await;
        r.unwrap();
    }
}

/// cuda_ipc's transfers, across two processes (this test binary runs itself again as
/// the peer, which echoes every tensor): every byte of each echo, tensors that start
/// inside their allocations on both ends (the bytes around them untouched), many in
/// flight, zero-length and large ones, and a sender whose stream is still busy
/// producing the tensor when it is sent.
#[test]
fn cuda_ipc_between_two_processes() {
    if let Ok(addr) = std::env::var(IPC_PEER) {
        run(Executor::BlockOn, ipc_peer(addr));
        return;
    }
    if gpus("cuda_ipc_between_two_processes").is_none() {
        return;
    }
    let tcp = tp_transport::tcp::TcpTransport::new();
    let listener = tp_transport::Transport::listen(&tcp, "127.0.0.1:0").unwrap();
    let addr = listener.address().to_string();
    let mut peer = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "conformance::cuda_channel::cuda_ipc_between_two_processes",
            "--exact",
            "--nocapture",
        ])
        .env(IPC_PEER, &addr)
        .spawn()
        .unwrap();
    run(Executor::BlockOn, async move {
        let mut conns: Vec<Option<_>> = vec![None, None];
        for _ in 0..2 {
            let c = listener.accept().await.unwrap();
            let mut i = [0u8; 8];
            c.read_exact(&mut i).await.unwrap();
            conns[u64::from_le_bytes(i) as usize] = Some(c);
        }
        let ctx = tp_cuda::ipc::CudaIpcContext::default();
        let ch = ctx
            .create_channel(
                conns.into_iter().map(Option::unwrap).collect(),
                tp_channel::Endpoint::Listen,
            )
            .await
            .unwrap();
        ipc_echoes(&ch).await;
    });
    assert!(peer.wait().unwrap().success(), "the peer process failed");
}

/// A GPU buffer of `len` bytes that starts 128 bytes into an allocation whose other
/// bytes hold `guard`.
fn interior(len: usize, fill: &[u8], guard: u8, stream: RawStream) -> CudaBuffer {
    let whole = [vec![guard; 128], fill.to_vec(), vec![guard; 64]].concat();
    let mut base = CudaBuffer::alloc(0, whole.len(), stream).unwrap();
    base.copy_from_host(&whole).unwrap();
    // SAFETY: `len` bytes from offset 128 lie inside `base`, which the buffer owns.
    unsafe { CudaBuffer::from_raw(base.addr() + 128, len, 0, stream, Some(Box::new(base))) }
        .unwrap()
}

async fn ipc_echoes(ch: &BoxChannel) {
    let stream = OwnedStream::new(0).unwrap();
    let lens = ipc_lens();
    let mut data: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, i as u8))
        .collect();
    data[0] = vec![0x42; lens[0]];
    // Every source but the first, filled now (copy_from_host waits for the stream).
    let mut bufs: Vec<Box<dyn SendBuf>> = data
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, d)| match i {
            3 => Box::new(interior(d.len(), d, 0xEE, stream.raw())) as Box<dyn SendBuf>,
            _ => source(At::Gpu(0), d, stream.raw()),
        })
        .collect();
    // The first one's producer is still running when it is sent: fills of a large
    // scratch buffer queued ahead of the fill that writes it.
    let mut first = CudaBuffer::alloc(0, lens[0], stream.raw()).unwrap();
    first.fill_async(0).unwrap();
    let mut scratch = CudaBuffer::alloc(0, 256 << 20, stream.raw()).unwrap();
    stream.synchronize().unwrap();
    for _ in 0..20 {
        scratch.fill_async(1).unwrap();
    }
    first.fill_async(0x42).unwrap();
    bufs.insert(0, Box::new(first));
    let sends: Vec<_> = bufs.into_iter().map(|b| ch.send(b)).collect();
    let recvs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let buf: Box<dyn RecvBuf> = if i == 3 {
                Box::new(interior(n, &vec![0; n], 0xDD, stream.raw()))
            } else {
                target(At::Gpu(0), n, stream.raw())
            };
            ch.recv(buf)
        })
        .collect();
    let (sent, got) = join(join_all(sends), join_all(recvs)).await;
    for (i, ((_, rs), (buf, rr))) in sent.into_iter().zip(got).enumerate() {
        rs.unwrap_or_else(|e| panic!("send {i}: {e}"));
        rr.unwrap_or_else(|e| panic!("recv {i}: {e}"));
        let any: Box<dyn Any> = buf;
        let b = any.downcast::<CudaBuffer>().unwrap();
        assert!(
            b.to_host().unwrap() == data[i],
            "tensor {i} ({} B)",
            data[i].len()
        );
        if i == 3 {
            // SAFETY: the allocation `b` lies in: 128 bytes before it, 64 after.
            let around = unsafe {
                CudaBuffer::from_raw(b.addr() - 128, 128 + b.len() + 64, 0, stream.raw(), None)
            }
            .unwrap()
            .to_host()
            .unwrap();
            assert!(
                around[..128].iter().all(|&x| x == 0xDD),
                "before it: untouched"
            );
            assert!(
                around[128 + b.len()..].iter().all(|&x| x == 0xDD),
                "after it: untouched"
            );
        }
    }
    drop(scratch);
}
