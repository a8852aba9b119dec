//! Facts of the machine the daemon reads once (its name and its memory), and its own
//! standing on it (its priority).

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

/// What [`outrank_the_analyses`] could not take, said once the daemon is up.
static NOT_OUTRANKED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Before any thread starts: the OOM killer takes anything before the daemon (under
/// the unit systemd has set it, `OOMScoreAdjust=`, and nothing is left to do). What it
/// may not take is kept for [`not_outranked`]: a daemon that cannot start says only
/// why. Its niceness is left as it is: at -10 its wake-ups preempt a watched forker so
/// often that the forker's rate falls to a quarter (see the closing note's figures);
/// CPU share under contention is the unit's `CPUWeight=`.
pub fn outrank_the_analyses() {
    let mut not_taken = Vec::new();
    let adj = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    if adj.is_some_and(|a| a > -900)
        && let Err(err) = std::fs::write("/proc/self/oom_score_adj", "-900")
    {
        not_taken.push(format!(
            "the OOM killer may pick the daemon as soon as an analysis (oom_score_adj {}): \
             could not lower it to -900 ({err}); give it CAP_SYS_RESOURCE or run it under \
             the unit (OOMScoreAdjust=)",
            adj.unwrap_or(0)
        ));
    }
    let _ = NOT_OUTRANKED.set(not_taken);
}

/// The lines saying what priority the daemon could not take.
pub fn not_outranked() -> &'static [String] {
    NOT_OUTRANKED.get().map_or(&[], Vec::as_slice)
}
