#![no_main]
//! cuda_gdr's channel setup frames, as a peer sends them: the NIC count and the queue
//! pair records of the mesh. Never panics; whatever decodes re-encodes to the same
//! bytes, at exactly the length the counts give.

use libfuzzer_sys::fuzz_target;
use tp_cuda::gdr::{MAX_NICS, MeshSetup};

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let Ok(nics) = MeshSetup::decode_count(&[count]) else {
        assert!(count == 0 || usize::from(count) > MAX_NICS);
        return;
    };
    let Some((&ours, frame)) = rest.split_first() else {
        return;
    };
    let peer_nics = usize::from(ours) % MAX_NICS + 1;
    if let Ok(m) = MeshSetup::decode_records(frame, nics, peer_nics) {
        assert_eq!(frame.len(), MeshSetup::records_len(nics, peer_nics));
        assert_eq!(m.records.len(), nics * peer_nics);
        assert_eq!(m.encode_records(), frame);
    }
});
