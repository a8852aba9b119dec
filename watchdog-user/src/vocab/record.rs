//! The record of one violation, kill or warning: what the core makes, the store keeps,
//! and `events`, `status` and the page show.

use serde::{Deserialize, Serialize};

use crate::vocab::limits::Reason;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SignalSent {
    pub signal: String,
    pub at: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    ExitedAfterSigterm,
    Killed,
    AlreadyGone,
    /// Orphan policy `log`: recorded, not signalled.
    Logged,
    /// `--dry-run`: what would have been signalled.
    DryRun,
    /// Reason `warning`: the warning signal was sent; nothing is killed for it.
    Warned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExitedAfterSigterm => "exited_after_sigterm",
            Self::Killed => "killed",
            Self::AlreadyGone => "already_gone",
            Self::Logged => "logged",
            Self::DryRun => "dry_run",
            Self::Warned => "warned",
        }
    }
}

/// One violation or kill, with everything an operator needs to answer "what was killed,
/// why, and how big was it".
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KillRecord {
    pub time: String,
    pub host: String,
    pub pid: u32,
    pub ppid: u32,
    pub analysis_id: String,
    pub reason: Reason,
    /// The limit that was crossed, in its unit (bytes or ms); for orphans, none.
    pub limit: Option<u64>,
    pub rss_bytes: u64,
    pub runtime_ms: u64,
    pub signals: Vec<SignalSent>,
    pub outcome: Outcome,
    pub comm: String,
    pub cmdline: String,
    pub uid: u32,
    /// Uid of the caller that created the analysis (None in records of a build that
    /// did not keep it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// Reason `warning`: the limit warned of (`limit` is that limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warned_of: Option<Reason>,
    /// Reason `zombies`: how many exited children the process held unreaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zombies: Option<u64>,
    /// Reason `tree_memory`: what crossed the limit, the analysis' PSS summed over its
    /// processes from /proc/PID/smaps_rollup (a page shared by N processes counts 1/N
    /// in each), measured once the sum of their RSS (`tree_rss_bytes`, which counts a
    /// shared page N times) had crossed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_pss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_rss_bytes: Option<u64>,
}
