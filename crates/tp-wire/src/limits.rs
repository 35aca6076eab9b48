//! Limits on what a peer may announce.

/// Upper bounds applied to every length and count read from the wire.
///
/// Each check happens *before* anything is allocated or sliced, so a peer can make the
/// receiver spend at most the bytes it actually sent. The defaults suit an RPC system that
/// moves large tensors: they bound control frames, not tensor data.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct Limits {
    /// Largest frame body (bytes after the 12-byte header). Default 16 MiB.
    pub max_frame_len: u32,
    /// Largest metadata field (message, payload or tensor metadata). Default 1 MiB.
    pub max_metadata_len: u32,
    /// Largest name, address or descriptor string. Default 4 KiB.
    pub max_string_len: u32,
    /// Most payloads in one message. Default 1024.
    pub max_payloads: u32,
    /// Most tensors in one message. Default 4096.
    pub max_tensors: u32,
    /// Most elements in any other list (transport and channel offers, devices per channel,
    /// registration ids, device pairs). Default 1024.
    pub max_list_len: u32,
    /// Largest sum of all payload and tensor lengths of one message. Default 1 TiB.
    pub max_message_len: u64,
}

impl Limits {
    /// The default limits (see each field).
    pub const DEFAULT: Self = Self {
        max_frame_len: 16 << 20,
        max_metadata_len: 1 << 20,
        max_string_len: 4 << 10,
        max_payloads: 1024,
        max_tensors: 4096,
        max_list_len: 1024,
        max_message_len: 1 << 40,
    };

    /// No limit beyond what the format can express. Used to re-read bytes that were
    /// already validated; never use it on fresh peer input.
    pub const UNLIMITED: Self = Self {
        max_frame_len: u32::MAX,
        max_metadata_len: u32::MAX,
        max_string_len: u32::MAX,
        max_payloads: u32::MAX,
        max_tensors: u32::MAX,
        max_list_len: u32::MAX,
        max_message_len: u64::MAX,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}
