//! Facts about this process's place in the system, for channel descriptors.

/// The kernel's boot id: equal on both ends only on the same machine and boot.
///
/// # Errors
/// Why it cannot be read.
pub fn boot_id() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read the boot id: {e}"))
}

/// A namespace's identity (`pid:[4026531836]`), from `/proc/self/ns/<kind>`.
///
/// # Errors
/// Why it cannot be read.
pub fn namespace(kind: &str) -> Result<String, String> {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .map(|p| p.display().to_string())
        .map_err(|e| format!("cannot read the {kind} namespace: {e}"))
}
