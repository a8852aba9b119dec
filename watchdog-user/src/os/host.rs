//! Facts of the machine the daemon reads once: its name and its memory.

/// The host's name, for the records.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The machine's total memory in bytes (MemTotal), through sysinfo; None when it cannot
/// be read. Read once, at start: a per-process memory limit above it is refused.
pub fn machine_memory() -> Option<u64> {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    let ram = RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram());
    let system = System::new_with_specifics(ram).ok()?;
    Some(system.total_memory()).filter(|&bytes| bytes > 0)
}
