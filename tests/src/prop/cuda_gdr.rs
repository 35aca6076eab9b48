//! Property tests for what cuda_gdr trusts from a peer and how it splits reads: the
//! per-tensor descriptor and the channel setup's queue pair mesh round-trip and refuse
//! anything else cleanly; a read plan
//! covers its span exactly once, in order, never exceeds its window, and accepts only
//! the completion that is due.

use std::collections::VecDeque;

use proptest::prelude::*;
use tp_cuda::gdr::{GdrDescriptor, MAX_NICS, MeshSetup};
use tp_transport::ibv::proto::{SETUP_LEN, SetupInfo};
use tp_transport::ibv::read::{ReadError, ReadPlan};

fn descriptor() -> impl Strategy<Value = GdrDescriptor> {
    prop_oneof![
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(nic, addr, len, rkey)| GdrDescriptor::Readable {
                nic,
                addr,
                len,
                rkey
            }
        ),
        Just(GdrDescriptor::Unavailable),
    ]
}

/// A valid queue pair record, as `SetupInfo::decode` accepts it.
fn record() -> impl Strategy<Value = SetupInfo> {
    (
        any::<u16>(),
        any::<u8>(),
        0u32..(1 << 24),
        any::<[u8; 16]>(),
        0u32..(1 << 24),
        any::<u32>(),
    )
        .prop_map(|(lid, mtu, qpn, gid, psn, max_message)| SetupInfo {
            lid,
            mtu,
            qpn,
            gid,
            inbox_addr: 0,
            inbox_rkey: 0,
            psn,
            inbox_capacity: 1,
            max_message,
        })
}

fn mesh() -> impl Strategy<Value = MeshSetup> {
    (1..=MAX_NICS, 1..=MAX_NICS).prop_flat_map(|(nics, peer_nics)| {
        prop::collection::vec(record(), nics * peer_nics).prop_map(move |records| MeshSetup {
            nics,
            peer_nics,
            records,
        })
    })
}

proptest! {
    #[test]
    fn descriptors_round_trip(d in descriptor()) {
        let bytes = d.encode();
        prop_assert!(bytes.len() <= GdrDescriptor::MAX_LEN);
        prop_assert_eq!(GdrDescriptor::decode(&bytes).unwrap(), d);
    }

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
        if let Ok(d) = GdrDescriptor::decode(&bytes) {
            prop_assert_eq!(d.encode(), bytes);
        }
    }

    #[test]
    fn every_cut_or_extension_of_a_descriptor_is_refused(
        d in descriptor(),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let bytes = d.encode();
        let at = cut.index(bytes.len());
        prop_assert!(GdrDescriptor::decode(&bytes[..at]).is_err());
        prop_assert!(GdrDescriptor::decode(&[&bytes[..], &extra[..]].concat()).is_err());
    }

    #[test]
    fn mesh_setups_round_trip(m in mesh()) {
        prop_assert_eq!(
            MeshSetup::decode_count(&MeshSetup::encode_count(m.nics)).unwrap(),
            m.nics
        );
        let frame = m.encode_records();
        prop_assert_eq!(frame.len(), MeshSetup::records_len(m.nics, m.peer_nics));
        prop_assert_eq!(MeshSetup::decode_records(&frame, m.nics, m.peer_nics).unwrap(), m);
    }

    /// A records frame is taken only at the length the two counts give, and any
    /// count frame other than one byte in 1..=MAX_NICS is refused.
    #[test]
    fn mesh_frames_of_another_shape_are_refused(
        m in mesh(),
        nics in 1..=MAX_NICS,
        peer_nics in 1..=MAX_NICS,
        count in prop::collection::vec(any::<u8>(), 0..3),
    ) {
        let frame = m.encode_records();
        let fits = frame.len() == nics * peer_nics * SETUP_LEN;
        prop_assert_eq!(MeshSetup::decode_records(&frame, nics, peer_nics).is_ok(), fits);
        let good = count.len() == 1 && (1..=MAX_NICS).contains(&usize::from(count[0]));
        prop_assert_eq!(MeshSetup::decode_count(&count).is_ok(), good);
    }

    /// Drives a plan against an in-order queue pair that completes a random number of
    /// requests per poll, and throws a wrong completion at it now and then.
    #[test]
    fn a_read_plan_covers_its_span_once_within_its_window(
        len in 0u64..(1 << 22),
        max in 1u32..(1 << 20),
        window in 1u32..20,
        first_id in any::<u64>(),
        bursts in prop::collection::vec(0usize..5, 1..64),
        bogus in prop::collection::vec(any::<u64>(), 0..8),
    ) {
        let mut plan = ReadPlan::new(len, max, window, first_id).unwrap();
        let mut in_flight = VecDeque::new();
        let mut covered = 0u64;
        let mut step = 0usize;
        while !plan.is_done() {
            while let Some(r) = plan.next_request() {
                prop_assert_eq!(r.offset, covered);
                prop_assert!(r.len > 0 && r.len <= max);
                prop_assert!(plan.outstanding() <= u64::from(window));
                prop_assert!(plan.owns(r.wr_id));
                covered += u64::from(r.len);
                in_flight.push_back(r.wr_id);
            }
            // A wrong id is refused and changes nothing.
            if let Some(&b) = bogus.get(step % 8)
                && in_flight.front() != Some(&b)
            {
                let due = in_flight.front().copied();
                prop_assert_eq!(
                    plan.complete(b),
                    Err(ReadError::UnexpectedCompletion { wr_id: b, expected: due })
                );
            }
            // At least one completion per round, so the loop ends.
            let n = bursts[step % bursts.len()].max(1);
            for _ in 0..n {
                let Some(id) = in_flight.pop_front() else { break };
                plan.complete(id).unwrap();
            }
            step += 1;
        }
        prop_assert_eq!(covered, len);
        prop_assert!(in_flight.is_empty());
        prop_assert_eq!(plan.next_first_id(), first_id.wrapping_add(len.div_ceil(u64::from(max))));
    }
}
