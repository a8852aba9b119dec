//! The record of one violation, kill or warning: what the core makes, the store keeps,
//! and `events`, `status` and the page show.

use serde::{Deserialize, Serialize};

use crate::vocab::limits::Reason;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SignalSent {
    pub signal: String,
    pub at: String,
    /// Who sent it, when not the daemon: `kernel`, the programs themselves, the moment
    /// the process crossed its limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A file in tmpfs (/dev/shm) that a killed analysis' members held and owned, still
/// there when its kill ended: its memory is not freed by the kill.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShmLeft {
    pub path: String,
    pub bytes: u64,
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
    /// Unregistered while it was being killed: let go alive after the signals listed.
    Released,
    /// Reason `max_processes` with the kernel refusing forks: the forks past the limit
    /// failed (EAGAIN) and nothing was signalled.
    Refused,
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
            Self::Released => "released",
            Self::Refused => "refused",
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
    /// Reasons `memory` and `tree_memory`: the part of the memory measured that was in
    /// tmpfs files (memfd, /dev/shm) and in no RSS: the process' for `memory`, the
    /// analysis' for `tree_memory` (added to `rss_bytes` or to `tree_pss_bytes` and
    /// `tree_rss_bytes`, which count RSS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shmem_bytes: Option<u64>,
    /// A whole analysis' kill, on its roots' records: the files its members left in
    /// tmpfs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shm_left: Vec<ShmLeft>,
    /// Outcome `refused`: how many forks of the analysis the kernel refused in this
    /// burst (`pid`: the process whose fork was refused first; `time`: then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_forks: Option<u64>,
}

/// The most of a command line a record keeps, bytes: a record's size is bounded
/// whatever a process puts in its arguments.
pub const CMDLINE_MAX: usize = 4096;

/// `bytes` (a command line as /proc gives it, NULs between arguments, read up to
/// [`CMDLINE_MAX`] + 1 bytes) as a record keeps it: arguments joined by spaces, cut at
/// [`CMDLINE_MAX`] on a character boundary and marked so when longer.
pub fn bounded_cmdline(bytes: &[u8]) -> String {
    let cut = bytes.len() > CMDLINE_MAX;
    let kept = &bytes[..bytes.len().min(CMDLINE_MAX)];
    let text = String::from_utf8_lossy(kept);
    let mut text = text.trim_end_matches('\0').replace('\0', " ");
    if cut {
        while text.len() > CMDLINE_MAX {
            text.pop();
        }
        text.push_str(" …[cut at 4096 bytes]");
    }
    text
}

impl KillRecord {
    /// About what the record costs in memory, bytes: its text and a fixed part.
    pub fn size_bytes(&self) -> usize {
        256 + self.cmdline.len()
            + self.comm.len()
            + self.analysis_id.len()
            + self.host.len()
            + self.signals.len() * 48
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_is_kept_whole_up_to_its_bound_and_marked_when_cut() {
        assert_eq!(
            bounded_cmdline(b"python\0fit.py\0--seed\x00042\0"),
            "python fit.py --seed 042"
        );
        let huge: Vec<u8> = std::iter::repeat_n(b'x', CMDLINE_MAX + 1).collect();
        let kept = bounded_cmdline(&huge);
        assert!(kept.ends_with(" …[cut at 4096 bytes]"), "{}", &kept[4000..]);
        assert_eq!(kept.len(), CMDLINE_MAX + " …[cut at 4096 bytes]".len());
        // A cut through a multi-byte character keeps valid text.
        let mut accents = vec![b'a'; CMDLINE_MAX - 1];
        accents.extend("é".repeat(4).as_bytes());
        assert!(bounded_cmdline(&accents).is_char_boundary(CMDLINE_MAX - 1));
    }
}
