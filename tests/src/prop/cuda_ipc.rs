//! Property tests for cuda_ipc's chunk descriptor, the one channel frame that carries a
//! peer's CUDA handles: every descriptor round-trips, arbitrary bytes never panic, and
//! whatever decodes re-encodes to the same bytes and respects the slot limit.

use proptest::prelude::*;
use tp_cuda::ipc::{ChunkDescriptor, MAX_SLOTS, OutboxInfo};

fn handle() -> impl Strategy<Value = [u8; 64]> {
    prop::collection::vec(any::<u8>(), 64).prop_map(|v| v.try_into().unwrap_or([0; 64]))
}

fn outbox() -> impl Strategy<Value = OutboxInfo> {
    (
        any::<u64>(),
        1..=u64::MAX,
        handle(),
        prop::collection::vec(handle(), 1..=MAX_SLOTS as usize),
    )
        .prop_map(|(id, slot_size, mem, events)| OutboxInfo {
            id,
            slot_size,
            mem,
            events,
        })
}

fn chunk() -> impl Strategy<Value = ChunkDescriptor> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        prop::option::of(outbox()),
    )
        .prop_map(|(device, slot, len, outbox)| ChunkDescriptor {
            device,
            slot,
            len,
            outbox,
        })
}

proptest! {
    #[test]
    fn chunk_descriptors_round_trip(d in chunk()) {
        let bytes = d.encode();
        prop_assert!(bytes.len() as u64 <= ChunkDescriptor::MAX_LEN);
        prop_assert_eq!(ChunkDescriptor::decode(&bytes).unwrap(), d);
    }

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(d) = ChunkDescriptor::decode(&bytes) {
            prop_assert_eq!(d.encode(), bytes);
            if let Some(o) = &d.outbox {
                prop_assert!((1..=MAX_SLOTS as usize).contains(&o.events.len()));
                prop_assert!(o.slot_size > 0);
            }
        }
    }

    #[test]
    fn every_cut_or_extension_of_a_valid_descriptor_is_refused(
        d in chunk(),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let bytes = d.encode();
        let at = cut.index(bytes.len());
        prop_assert!(ChunkDescriptor::decode(&bytes[..at]).is_err());
        prop_assert!(ChunkDescriptor::decode(&[&bytes[..], &extra[..]].concat()).is_err());
    }
}
