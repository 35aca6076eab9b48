//! Decoding a view allocates nothing: counted by a global allocator wrapper.
//!
//! Only the test's own thread is counted: the test harness's threads allocate when
//! they like (a busy machine made them do it inside the measured window).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tp_wire::packet::{
    BrochureAnswerRepr, BrochureRepr, DescriptorRepr, Seq, TensorDesc, frame_to_vec, parse_frame,
};
use tp_wire::{Device, Limits};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread's allocations count (const-initialized, no destructor: safe
    /// to read inside the allocator).
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
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

#[test]
fn decoding_views_allocates_nothing() {
    COUNTED.with(|c| c.set(true));
    let meta = vec![7u8; 1024];
    let tensors: Vec<TensorDesc<'_>> = (0..64)
        .map(|i| TensorDesc {
            length: i,
            source_device: Device::CPU,
            target_device: Some(Device::cuda(1)),
            metadata: b"f32",
        })
        .collect();
    let d = DescriptorRepr {
        metadata: &meta,
        payloads: Seq::Slice(&[]),
        tensors: Seq::Slice(&tensors),
    };
    let frame = frame_to_vec(&d).unwrap();
    let before = ALLOCS.load(Ordering::SeqCst);
    let view = parse_frame::<DescriptorRepr<'_>>(&frame, &Limits::DEFAULT).unwrap();
    let total: u64 = view.tensors.iter().map(|t| t.length).sum();
    let equal = view == d;
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst) - before,
        0,
        "decoding a view allocated"
    );
    assert_eq!(total, (0..64).sum());
    assert!(equal);
    // Failing decodes allocate nothing either (errors are Copy).
    let before = ALLOCS.load(Ordering::SeqCst);
    assert!(parse_frame::<BrochureRepr<'_>>(&frame, &Limits::DEFAULT).is_err());
    assert!(parse_frame::<BrochureAnswerRepr<'_>>(&frame[..40], &Limits::DEFAULT).is_err());
    assert_eq!(ALLOCS.load(Ordering::SeqCst) - before, 0);
}
