//! Property tests for cuda_basic's staging setup, the frame in which a peer names the
//! memory this process will map: every valid setup round-trips within `MAX_LEN`,
//! arbitrary bytes never panic, whatever decodes re-encodes to the same bytes (and
//! names a slot layout within the limits), and every cut or extension is refused.

use proptest::prelude::*;
use tp_cuda::basic::staging::{MAX_SLOT_LEN, MAX_SLOTS, StagingOffer, StagingSetup};

fn setup() -> impl Strategy<Value = StagingSetup> {
    prop_oneof![
        (
            "[ -~]{0,128}",
            any::<u32>(),
            any::<u32>(),
            1..=MAX_SLOTS,
            1..=MAX_SLOT_LEN / 4096,
            any::<[u8; 16]>(),
        )
            .prop_map(|(host, pid, fd, slots, pages, token)| {
                StagingSetup::Offer(StagingOffer {
                    host,
                    pid,
                    fd,
                    slots,
                    slot_len: pages * 4096,
                    token,
                })
            }),
        Just(StagingSetup::None),
    ]
}

proptest! {
    #[test]
    fn setups_round_trip(s in setup()) {
        let bytes = s.encode();
        prop_assert!(bytes.len() as u64 <= StagingSetup::MAX_LEN);
        prop_assert_eq!(StagingSetup::decode(&bytes).unwrap(), s);
    }

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(s) = StagingSetup::decode(&bytes) {
            prop_assert_eq!(s.encode(), bytes);
            if let StagingSetup::Offer(o) = s {
                prop_assert!((1..=MAX_SLOTS).contains(&o.slots));
                prop_assert!(o.slot_len <= MAX_SLOT_LEN && o.slot_len % 4096 == 0 && o.slot_len > 0);
            }
        }
    }

    #[test]
    fn every_cut_or_extension_of_a_valid_setup_is_refused(
        s in setup(),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let bytes = s.encode();
        let at = cut.index(bytes.len());
        prop_assert!(StagingSetup::decode(&bytes[..at]).is_err());
        prop_assert!(StagingSetup::decode(&[bytes.as_slice(), &extra].concat()).is_err());
    }
}
