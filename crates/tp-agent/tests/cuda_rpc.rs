//! The RPC agent carrying GPU tensors: device maps place a request's tensors on the
//! callee's GPUs, the reverse map brings the reply's back, and a GPU tensor without a
//! map is refused with the original's advice. Needs a GPU: without one every test
//! prints `SKIPPED: …` (and fails under `TP_REQUIRE_CUDA=1`).
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::executor::block_on;
use tp_agent::rpc::{Agent, AgentOptions, CallError, Reply, Request, RpcMessage, RpcTensor};
use tp_channel::Device;
use tp_cuda::{CudaBuffer, RawStream};
use tp_store::{MemoryStore, PrefixStore, Store};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn gpu(data: &[u8]) -> RpcTensor {
    let mut b = CudaBuffer::alloc(0, data.len(), RawStream::default()).unwrap();
    b.copy_from_host(data).unwrap();
    RpcTensor::Cuda(b)
}

fn host(t: &RpcTensor) -> Vec<u8> {
    match t.as_cuda() {
        Some(b) => b.to_host().unwrap(),
        None => t.as_cpu().unwrap().to_vec(),
    }
}

/// Adds 1 to every byte of every tensor, where it is; `stray` answers with a GPU
/// tensor whatever the request held.
fn handler(req: Request) -> Reply {
    let mut m = req.message;
    if m.payload == b"stray" {
        return Reply::from(RpcMessage::new("").with_tensor(gpu(&[1, 2, 3])));
    }
    let mut devices = Vec::new();
    for t in &mut m.tensors {
        devices.push(t.device().to_string());
        let bumped: Vec<u8> = host(t).iter().map(|b| b.wrapping_add(1)).collect();
        match t.as_cuda_mut() {
            Some(b) => {
                if let Err(e) = b.copy_from_host(&bumped) {
                    return Reply::Ready(Err(e.to_string()));
                }
            }
            None => *t.as_cpu_mut().unwrap() = bumped,
        }
    }
    m.payload = devices.join(",").into_bytes();
    Reply::from(m)
}

fn group(map: BTreeMap<Device, Device>) -> Vec<Agent> {
    let s: Arc<dyn Store> = Arc::new(MemoryStore::new());
    s.set_timeout(Duration::from_secs(30));
    let s: Arc<dyn Store> = Arc::new(PrefixStore::new("rpc_prefix_0", s));
    let threads: Vec<_> = (0..2u32)
        .map(|r| {
            let (s, map) = (s.clone(), map.clone());
            std::thread::spawn(move || {
                let mut o = AgentOptions {
                    world_size: Some(2),
                    rpc_timeout: Duration::from_secs(30),
                    ..AgentOptions::new(format!("w{r}"), r)
                };
                if r == 0 {
                    o.device_maps.insert("w1".into(), map);
                }
                Agent::start(o, s, handler).unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn shutdown(g: &[Agent]) {
    std::thread::scope(|sc| {
        for a in g {
            sc.spawn(move || a.shutdown().unwrap());
        }
    });
}

#[test]
fn device_maps_carry_cuda_tensors_there_and_back() {
    if tp_cuda::gpus_or_skip("cuda_rpc::device_maps_carry_cuda_tensors_there_and_back").is_none() {
        return;
    }
    let g = group(BTreeMap::from([(Device::cuda(0), Device::cuda(0))]));
    let cpu = pattern(1000, 1);
    let big = pattern((9 << 20) + 3, 2);
    let small = pattern(1, 3);
    let msg = RpcMessage::new("x")
        .with_tensor(RpcTensor::cpu(cpu.clone()))
        .with_tensor(gpu(&big))
        .with_tensor(gpu(&small));
    let reply = block_on(g[0].send("w1", msg, None)).unwrap();
    // The callee saw each tensor where the map put it.
    assert_eq!(reply.payload, b"cpu:0,cuda:0,cuda:0");
    let devices: Vec<Device> = reply.devices().collect();
    assert_eq!(devices, [Device::CPU, Device::cuda(0), Device::cuda(0)]);
    for (t, sent) in reply.tensors.iter().zip([&cpu, &big, &small]) {
        let want: Vec<u8> = sent.iter().map(|b| b.wrapping_add(1)).collect();
        assert!(host(t) == want, "a tensor's bytes differ");
    }
    shutdown(&g);
}

#[test]
fn cuda_tensors_without_a_map_or_on_a_stray_device_are_refused() {
    if tp_cuda::gpus_or_skip(
        "cuda_rpc::cuda_tensors_without_a_map_or_on_a_stray_device_are_refused",
    )
    .is_none()
    {
        return;
    }
    let g = group(BTreeMap::from([(Device::cuda(0), Device::cuda(0))]));
    // w1 has no map to w0.
    let e =
        block_on(g[1].send("w0", RpcMessage::new("x").with_tensor(gpu(&[1])), None)).unwrap_err();
    assert!(matches!(e, CallError::NoDeviceMap { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("move it to the CPU or set a device map"),
        "{e}"
    );
    // A reply on a GPU the request did not use.
    let e = block_on(g[0].send("w1", RpcMessage::new("stray"), None)).unwrap_err();
    assert!(
        e.to_string()
            .contains("not one of the input tensor devices"),
        "{e}"
    );
    // The pipe is still good.
    let reply =
        block_on(g[0].send("w1", RpcMessage::new("x").with_tensor(gpu(&[7])), None)).unwrap();
    assert_eq!(host(&reply.tensors[0]), [8]);
    shutdown(&g);
}
