//! What is watched now, as the core hands it to the store for `watchdog_processes`:
//! compact, so the daemon loop copies it in a moment; the store turns it into rows off
//! the loop.

use std::collections::HashMap;

use crate::vocab::{limits::Limits, process::AnalysisKey};

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
