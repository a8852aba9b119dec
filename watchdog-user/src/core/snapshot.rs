//! What is watched now, as the core hands it to the store for `watchdog_processes`:
//! compact, so the daemon loop copies it in a moment; the store turns it into rows off
//! the loop.

use std::collections::HashMap;

use std::collections::HashSet;

use crate::{
    core::world::{Clock, World},
    vocab::{limits::Limits, process::AnalysisKey},
};

/// What is watched now, as the rules hand it over: compact, so the daemon loop copies
/// it in a moment; the store's front task turns it into rows.
pub struct ProcessSnapshot {
    pub processes: Vec<ProcessBrief>,
    pub analyses: HashMap<AnalysisKey, AnalysisBrief>,
    pub wall: std::time::SystemTime,
    /// CLOCK_BOOTTIME at `wall`: start times are on this clock.
    pub boot_ns: u64,
}

pub struct ProcessBrief {
    pub pid: u32,
    pub ppid: u32,
    pub start_ns: u64,
    pub analysis: AnalysisKey,
    pub state: &'static str,
}

pub struct AnalysisBrief {
    pub id: String,
    pub limits: Limits,
    pub registered_wall: std::time::SystemTime,
    pub owner_uid: u32,
}

impl World {
    /// What is watched now, for `watchdog_processes`, when it changed since last asked:
    /// a compact copy, which the store turns into rows off the loop (formatting 100,000
    /// rows here stalled the loop for over a second).
    pub fn process_snapshot(&mut self, clock: &Clock) -> Option<ProcessSnapshot> {
        if !std::mem::take(&mut self.processes_dirty) {
            return None;
        }
        let pending: HashSet<u32> = self.jobs.iter().flat_map(|j| j.pending_pids()).collect();
        let processes = self
            .tree
            .iter()
            .map(|node| ProcessBrief {
                pid: node.pid,
                ppid: node.ppid,
                start_ns: node.start_ns,
                analysis: node.analysis,
                state: if pending.contains(&node.pid) {
                    "grace"
                } else if node.orphan {
                    "orphan"
                } else {
                    "running"
                },
            })
            .collect();
        let analyses = self
            .registry
            .iter()
            .map(|(key, a)| {
                let brief = AnalysisBrief {
                    id: a.id.clone(),
                    limits: a.limits.clone(),
                    registered_wall: a.registered_wall,
                    owner_uid: a.owner,
                };
                (key, brief)
            })
            .collect();
        Some(ProcessSnapshot {
            processes,
            analyses,
            wall: clock.wall,
            boot_ns: clock.boot_ns,
        })
    }
}
