//! The core's window on /proc: what it asks of processes while deciding, behind a
//! trait so that every rule is tested against a fake /proc.

use std::collections::HashSet;

use crate::vocab::process::{ProcRef, Uids};

#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    /// Start time, CLOCK_BOOTTIME ns (clock-tick precision).
    pub start_ns: u64,
    pub comm: String,
    pub kernel_thread: bool,
    /// Exited but not yet reaped (or being torn down): already gone for our purposes.
    pub exited: bool,
}

impl ProcInfo {
    pub fn proc_ref(&self) -> ProcRef {
        ProcRef {
            pid: self.pid,
            start_ns: self.start_ns,
        }
    }
}

/// What a kill record tells of a process, read before it is signalled.
#[derive(Clone, Debug, Default)]
pub struct Details {
    pub cmdline: String,
    pub uid: u32,
    pub rss_bytes: u64,
}

/// A tmpfs file (in /dev/shm or any tmpfs mount, a memfd, a SysV segment, a shared
/// anonymous mapping) a process holds open or mapped: its pages are memory no RSS
/// counts until a process maps and touches them, and a named one outlives its holders.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShmFile {
    pub dev: u64,
    pub ino: u64,
    /// Its path as the daemon sees it, when it has one there (not a memfd, not
    /// unlinked, not in another mount namespace): what a kill record lists as left.
    pub path: Option<String>,
    /// Its owner's uid.
    pub uid: u32,
}

/// The tmpfs files one process holds, read at the reconcile poll.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Held {
    /// Each distinct file once, with the bytes it has allocated.
    pub files: Vec<(ShmFile, u64)>,
    /// Its tmpfs pages already in its RSS (`RssShmem`): mapped and touched, they are
    /// not counted twice.
    pub rss_shmem: u64,
    /// The holder's effective uid: a file it owns is one it made (or may remove).
    pub uid: u32,
}

/// The rules' window on /proc.
pub trait Procs {
    /// The living process with this pid (zombies count as exited).
    fn read(&self, pid: u32) -> Option<ProcInfo>;
    /// Its command line, owner and RSS now; empty when its pid names another process
    /// now (never the newcomer's).
    fn details(&self, process: ProcRef) -> Details;
    /// Its RSS now, 0 when it is gone.
    fn rss_bytes(&self, pid: u32) -> u64;
    /// The real, effective and saved uids of `process` (/proc/PID/status `Uid:`): who
    /// runs it, and as whom. None when it is gone, or its pid names another process now.
    fn uids(&self, process: ProcRef) -> Option<Uids>;
    /// Its proportional set size now (a shared page counts 1/N in each of the N
    /// processes sharing it); None when it is gone or unreadable.
    fn pss_bytes(&self, pid: u32) -> Option<u64>;
    /// The parent of `process`, an exited process whose pid still names it (a zombie,
    /// or one still tearing down): its parent has not reaped it. None once it is reaped
    /// (or its pid names another process now).
    fn unreaped(&self, process: ProcRef) -> Option<u32>;
    /// The pids on `pid`'s list of children: living ones and those it has not reaped
    /// (a zombie stays on its parent's list until reaped). None when it cannot be read.
    fn children(&self, pid: u32) -> Option<HashSet<u32>>;
    /// The bytes `file` has allocated, found at its path, while that path still names
    /// it (same device and inode); None once it is gone (or has no path).
    fn shm_file_bytes(&self, file: &ShmFile) -> Option<u64>;
}
