//! What the running kernel lets the watchdog do.

use serde::{Deserialize, Serialize};

/// How this kernel lets one part of the watchdog work, decided at load from its BTF
/// and what it let the daemon attach: an operator reads it in `status` and /metrics
/// rather than in the start-up log.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelPath {
    /// The part: `memory` (limits and warnings between polls), `memory_from_others`
    /// (pages another process writes into a watched one), `memory_first_signal` (who
    /// sends a memory kill's SIGTERM: `kernel` or `daemon`), `rss_poll` (the reconcile
    /// poll), `registration_walk`, `exit` (how a process' last thread is told),
    /// `bpf_memory` (what the kernel charges the maps to), `fork_limit` (`refuse`: the
    /// kernel fails forks past the limit, or `kill`).
    pub path: String,
    /// How, as one token (a metric label): e.g. `kernel_events` or `poll_only`.
    pub how: String,
    /// What that means here, in one line: the layout read, or why it degrades.
    pub detail: String,
}

impl KernelPath {
    pub fn new(path: &str, how: &str, detail: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            how: how.into(),
            detail: detail.into(),
        }
    }
}
