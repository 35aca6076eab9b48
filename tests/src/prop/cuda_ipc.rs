//! Property tests for cuda_ipc's tensor descriptor, the one channel frame that carries a
//! peer's CUDA memory handle: every descriptor round-trips within `MAX_LEN`, arbitrary
//! bytes never panic, whatever decodes re-encodes to the same bytes, and every cut or
//! extension of a valid descriptor is refused.

use proptest::prelude::*;
use tp_cuda::ipc::TensorDescriptor;

fn descriptor() -> impl Strategy<Value = TensorDescriptor> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 64),
        )
            .prop_map(|(buffer_id, offset, len, h)| TensorDescriptor::Exported {
                buffer_id,
                offset,
                len,
                handle: h.try_into().unwrap_or([0; 64]),
            }),
        Just(TensorDescriptor::Unexportable),
    ]
}

proptest! {
    #[test]
    fn tensor_descriptors_round_trip(d in descriptor()) {
        let bytes = d.encode();
        prop_assert!(bytes.len() as u64 <= TensorDescriptor::MAX_LEN);
        prop_assert_eq!(TensorDescriptor::decode(&bytes).unwrap(), d);
    }

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(d) = TensorDescriptor::decode(&bytes) {
            prop_assert_eq!(d.encode(), bytes);
        }
    }

    #[test]
    fn every_cut_or_extension_of_a_valid_descriptor_is_refused(
        d in descriptor(),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let bytes = d.encode();
        let at = cut.index(bytes.len());
        prop_assert!(TensorDescriptor::decode(&bytes[..at]).is_err());
        prop_assert!(TensorDescriptor::decode(&[&bytes[..], &extra[..]].concat()).is_err());
    }
}
