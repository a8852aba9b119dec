//! What the kernel tells the core, decoded from the ring buffer: the core's input
//! vocabulary for process lifetimes and memory.

use crate::vocab::process::{AnalysisKey, Comm, ProcRef};

/// One kernel event about a watched process.
#[derive(Debug, Clone, Copy)]
pub enum KernelEvent {
    Fork {
        pid: u32,
        ppid: u32,
        analysis: AnalysisKey,
        start_ns: u64,
        comm: Comm,
        ts_ns: u64,
        /// The kernel map could not take the child: the kernel does not follow it.
        untracked: bool,
        /// Its parent is a launcher, not a member: the child is a new root.
        launched: bool,
    },
    Exit {
        pid: u32,
        analysis: AnalysisKey,
        start_ns: u64,
        exit_status: i32,
    },
    Exec {
        pid: u32,
        comm: Comm,
    },
    Rss {
        pid: u32,
        analysis: AnalysisKey,
        rss_bytes: u64,
    },
    /// The kernel's sum of an analysis' RSS (analyses with a tree limit), kept exact
    /// as each process' RSS changes, however little.
    TreeRss {
        analysis: AnalysisKey,
        rss_sum: u64,
    },
    /// The kernel sent `process` its memory kill's SIGTERM at `ts_ns` (CLOCK_BOOTTIME),
    /// the moment its RSS crossed its limit in its own page fault.
    Struck {
        process: ProcRef,
        analysis: AnalysisKey,
        rss_bytes: u64,
        ts_ns: u64,
    },
    /// The kernel refused a fork of `pid`, a member of `analysis`, that would have
    /// taken it past its process limit: the first of a burst (`refused`: the
    /// analysis' refusals so far). The burst is recorded once it is over.
    Refused {
        pid: u32,
        analysis: AnalysisKey,
        refused: u64,
    },
}
