//! Pipes carrying GPU tensors: the handshake picks a CUDA channel per device pair, the
//! pipe routes each tensor by its buffer's device, and the bytes arrive intact. Needs
//! a GPU: without one every test prints `SKIPPED: …` (and fails under
//! `TP_REQUIRE_CUDA=1`).
#![cfg(feature = "cuda")]

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use futures::executor::block_on;
use futures::future::join;
use tp_agent::{Allocation, Context, Message, Tensor};
use tp_channel::{Device, RecvBuf};
use tp_cuda::{CudaBuffer, RawStream};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
}

fn gpu_tensor(data: &[u8]) -> Tensor {
    let mut b = CudaBuffer::alloc(0, data.len(), RawStream::default()).unwrap();
    b.copy_from_host(data).unwrap();
    Tensor {
        data: Box::new(b),
        target_device: Some(Device::cuda(0)),
        metadata: Vec::new(),
    }
}

fn contents(buf: &dyn RecvBuf) -> Vec<u8> {
    let any: &dyn Any = buf;
    match any.downcast_ref::<CudaBuffer>() {
        Some(b) => b.to_host().unwrap(),
        None => buf.bytes().to_vec(),
    }
}

/// Sends a CPU tensor and a GPU tensor (to cuda:0) between two contexts of this
/// process restricted to `channels`; returns the channels the pipe chose.
fn gpu_round_trip(channels: &[&str]) -> Vec<String> {
    let names: Vec<String> = channels.iter().map(ToString::to_string).collect();
    let make = |name: &str| Arc::new(Context::builder(name).use_channels(&names).build().unwrap());
    let (server_ctx, client_ctx) = (make("server"), make("client"));
    let listener = server_ctx.listen(&["tcp://127.0.0.1:0"]).unwrap();
    let url = listener.urls()[0].clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let chosen = block_on(async {
            let client = client_ctx.connect(&url).unwrap();
            let server = listener.accept().await.unwrap();
            let cpu = pattern(4096, 1);
            let gpu = pattern((9 << 20) + 5, 2);
            let msg = Message {
                metadata: b"m".to_vec(),
                payloads: Vec::new(),
                tensors: vec![
                    Tensor {
                        data: Box::new(cpu.clone()),
                        target_device: None,
                        metadata: Vec::new(),
                    },
                    gpu_tensor(&gpu),
                ],
            };
            let (w, r) = join(client.write(msg), async {
                let inc = server.read_descriptor().await.unwrap();
                let d = &inc.descriptor;
                assert_eq!(d.tensors[1].source_device, Device::cuda(0));
                let tensors = d
                    .tensors
                    .iter()
                    .map(|t| -> Box<dyn RecvBuf> {
                        let n = usize::try_from(t.length).unwrap();
                        match t.target_device {
                            Some(dev) if dev != Device::CPU => Box::new(
                                CudaBuffer::alloc(dev.index, n, RawStream::default()).unwrap(),
                            ),
                            _ => Box::new(vec![0u8; n]),
                        }
                    })
                    .collect();
                let alloc = Allocation {
                    payloads: Vec::new(),
                    tensors,
                };
                server.read(inc, alloc).await
            })
            .await;
            w.1.unwrap();
            r.1.unwrap();
            assert_eq!(contents(&*r.0.tensors[0]), cpu);
            assert!(contents(&*r.0.tensors[1]) == gpu);
            client.channel_names()
        });
        let _ = tx.send(chosen);
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("panicked or hung")
}

#[test]
fn gpu_tensors_cross_a_pipe_by_cuda_xth_inside_one_process() {
    if tp_cuda::gpus_or_skip("gpu_tensors_cross_a_pipe_by_cuda_xth").is_none() {
        return;
    }
    let chosen = gpu_round_trip(&["basic", "cuda_xth", "cuda_basic"]);
    assert!(chosen.contains(&"cuda_xth".to_string()), "{chosen:?}");
}

#[test]
fn gpu_tensors_cross_a_pipe_by_cuda_basic_when_it_is_the_only_cuda_channel() {
    if tp_cuda::gpus_or_skip("gpu_tensors_cross_a_pipe_by_cuda_basic").is_none() {
        return;
    }
    let chosen = gpu_round_trip(&["basic", "cuda_basic"]);
    assert!(chosen.contains(&"cuda_basic".to_string()), "{chosen:?}");
}
