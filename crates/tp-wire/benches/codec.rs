//! Descriptor encode/decode micro-benchmark: 64 tensors and 1 KiB of message metadata.
//!
//! Run: `cargo bench -p tp-wire --bench codec` (release build). Prints ns per operation
//! (median of 15 batches) and the allocations each operation makes, counted by a global
//! allocator wrapper. Decoding a view must make none.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tp_wire::packet::{
    Descriptor, DescriptorRepr, Seq, TensorDesc, emit_frame, frame_len, frame_to_vec, parse_frame,
};
use tp_wire::{Device, Limits};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn bench(name: &str, iters: u32, mut f: impl FnMut()) {
    for _ in 0..iters / 10 {
        f();
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    f();
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    println!(
        "{name:<44} {:>9.1} ns/op   {allocs:>3} allocations/op",
        samples[7]
    );
}

fn main() {
    let metadata = vec![0x5a; 1024];
    let tensor_meta: Vec<Vec<u8>> = (0..64)
        .map(|i| format!("float32[{i},1024]").into_bytes())
        .collect();
    let tensors: Vec<TensorDesc<'_>> = tensor_meta
        .iter()
        .enumerate()
        .map(|(i, m)| TensorDesc {
            length: 4096 * (i as u64 + 1),
            source_device: Device::CPU,
            target_device: (i % 2 == 0).then_some(Device::cuda(0)),
            metadata: m,
        })
        .collect();
    let repr = DescriptorRepr {
        metadata: &metadata,
        payloads: Seq::Slice(&[]),
        tensors: Seq::Slice(&tensors),
    };
    let owned: Descriptor = repr.to_owned();
    let mut buf = vec![0u8; frame_len(&repr)];
    let n = emit_frame(&repr, &mut buf).unwrap();
    println!("descriptor: 64 tensors, 1 KiB metadata, {n} bytes framed\n");

    bench(
        "encode view into caller buffer (emit_frame)",
        200_000,
        || {
            black_box(emit_frame(black_box(&repr), &mut buf).unwrap());
        },
    );
    bench("decode view (parse_frame, validates all)", 200_000, || {
        black_box(parse_frame::<DescriptorRepr<'_>>(black_box(&buf), &Limits::DEFAULT).unwrap());
    });
    bench("decode view + iterate every tensor", 200_000, || {
        let d = parse_frame::<DescriptorRepr<'_>>(black_box(&buf), &Limits::DEFAULT).unwrap();
        black_box(d.tensors.iter().map(|t| t.length).sum::<u64>());
    });
    bench("decode to owned Descriptor (to_owned)", 50_000, || {
        black_box(
            parse_frame::<DescriptorRepr<'_>>(black_box(&buf), &Limits::DEFAULT)
                .unwrap()
                .to_owned(),
        );
    });
    bench("encode owned Descriptor (with_repr + Vec)", 50_000, || {
        black_box(owned.with_repr(|r| frame_to_vec(r)).unwrap());
    });
    let mut copy = vec![0u8; n];
    bench("reference: memcpy of the same bytes", 1_000_000, || {
        copy.copy_from_slice(black_box(&buf));
        black_box(&copy);
    });
}
