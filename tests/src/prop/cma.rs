//! Property tests for cma's two frames (the tensor descriptor and the help request),
//! which carry addresses and process ids from a peer: every frame round-trips,
//! arbitrary bytes never panic and whatever decodes re-encodes to the same bytes, and
//! every cut or extension of a valid frame is refused.

use proptest::prelude::*;
use tp_channel::cma::wire::{HelpRequest, SECRET_LEN, TensorDescriptor};

fn descriptor() -> impl Strategy<Value = TensorDescriptor> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        prop::option::of(prop::array::uniform16(any::<u8>())),
    )
        .prop_map(|(pid, address, length, secret)| TensorDescriptor {
            pid,
            address,
            length,
            secret,
        })
}

fn request() -> impl Strategy<Value = HelpRequest> {
    (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(pid, destination, from, proof)| HelpRequest {
            pid,
            destination,
            from,
            proof,
        },
    )
}

proptest! {
    #[test]
    fn frames_round_trip(d in descriptor(), r in request()) {
        let bytes = d.encode();
        let expected = if d.secret.is_some() { TensorDescriptor::OFFER_LEN } else { TensorDescriptor::LEN };
        prop_assert_eq!(bytes.len(), expected);
        prop_assert_eq!(TensorDescriptor::decode(&bytes).unwrap(), d);
        let bytes = r.encode();
        prop_assert_eq!(bytes.len(), HelpRequest::LEN);
        prop_assert_eq!(HelpRequest::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(d) = TensorDescriptor::decode(&bytes) {
            prop_assert_eq!(d.encode(), bytes.clone());
        }
        if let Ok(r) = HelpRequest::decode(&bytes) {
            prop_assert_eq!(r.encode(), bytes);
        }
    }

    #[test]
    fn every_cut_or_extension_of_a_valid_frame_is_refused(
        d in descriptor(),
        r in request(),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let bytes = r.encode();
        let at = cut.index(bytes.len());
        prop_assert!(HelpRequest::decode(&bytes[..at]).is_err());
        prop_assert!(HelpRequest::decode(&[&bytes[..], &extra[..]].concat()).is_err());
        // A descriptor's one valid cut is the offer's secret, whole: without it the
        // bytes are a descriptor that offers nothing.
        let bytes = d.encode();
        let at = cut.index(bytes.len());
        let cut_ok = TensorDescriptor::decode(&bytes[..at]);
        if at == TensorDescriptor::LEN {
            prop_assert_eq!(cut_ok.unwrap(), TensorDescriptor { secret: None, ..d });
        } else {
            prop_assert!(cut_ok.is_err());
        }
        let longer = [&bytes[..], &extra[..]].concat();
        if bytes.len() == TensorDescriptor::LEN && extra.len() == SECRET_LEN {
            prop_assert!(TensorDescriptor::decode(&longer).is_ok());
        } else {
            prop_assert!(TensorDescriptor::decode(&longer).is_err());
        }
    }
}
