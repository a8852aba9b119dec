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

/// Niceness of the thread that sends a kill's first signals while it does: a kill
/// whose targets spin on every core (a fork bomb at its process limit) must not wait
/// for a CPU share among them. The daemon is left at its own niceness otherwise: at
/// -10 for good its wake-ups would slow every watched forker.
const KILLING_NICE: i32 = -10;

/// The calling thread at [`KILLING_NICE`] until dropped, then back to where it was;
/// nothing when the daemon may not raise its priority (no CAP_SYS_NICE).
pub struct KillingPriority {
    tid: libc::id_t,
    before: Option<i32>,
}

impl KillingPriority {
    pub fn take() -> Self {
        // SAFETY: gettid takes nothing; get/setpriority take plain integers (the tid
        // is this thread's own, alive as long as this guard).
        let tid = unsafe { libc::gettid() } as libc::id_t;
        let before = unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
            let read = *libc::__errno_location() == 0;
            (read
                && nice > KILLING_NICE
                && libc::setpriority(libc::PRIO_PROCESS, tid, KILLING_NICE) == 0)
                .then_some(nice)
        };
        Self { tid, before }
    }
}

impl Drop for KillingPriority {
    fn drop(&mut self) {
        if let Some(nice) = self.before {
            // SAFETY: as above; this thread is the one the guard was taken on.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, nice) };
        }
    }
}
