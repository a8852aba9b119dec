//! Killing safely: through pidfds opened on a process whose identity (pid + start time)
//! was checked after opening, so a recycled PID is never signalled; SIGTERM, a grace,
//! then SIGKILL to whatever is left; one record per process with what happened.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Instant, SystemTime},
};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::{policy::Reason, procs};

/// A handle on one process that stays bound to it even if its PID is reused.
pub struct PidFd(OwnedFd);

impl std::os::fd::AsRawFd for PidFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl PidFd {
    /// Opens `pid` and checks it is still the process that started at `start_ns`.
    /// None when it is gone or the PID now names another process.
    pub fn open_verified(pid: u32, start_ns: u64) -> Option<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let pidfd = Self(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        // Checked after opening: had the PID been recycled before the open, the start
        // time read now is the new process'; after the open the fd is bound.
        let same = procs::read(pid).is_some_and(|p| procs::same_start(p.start_ns, start_ns));
        same.then_some(pidfd)
    }

    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        // SAFETY: a valid pidfd, a valid signal number, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Whether the process has exited: a pidfd polls readable once it has.
    pub fn exited(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        rc > 0 && fds[0].revents & libc::POLLIN != 0
    }
}

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
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExitedAfterSigterm => "exited_after_sigterm",
            Self::Killed => "killed",
            Self::AlreadyGone => "already_gone",
            Self::Logged => "logged",
            Self::DryRun => "dry_run",
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
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What is known of a target when the kill starts.
pub struct TargetInfo {
    pub pid: u32,
    pub ppid: u32,
    pub start_ns: u64,
    pub comm: String,
}

struct Target {
    info: TargetInfo,
    pidfd: Option<PidFd>,
    cmdline: String,
    uid: u32,
    rss_bytes: u64,
    runtime_ms: u64,
    signals: Vec<SignalSent>,
    sigkilled: bool,
    done: bool,
}

/// What a kill covers; processes forked into the scope while it dies join it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The process alone (per-process memory).
    Process,
    /// The process and its descendants (orphans).
    Subtree,
    /// Every process of the analysis (timeout, tree memory).
    Analysis,
}

/// A kill in progress: its targets, and when the grace ends.
pub struct KillJob {
    pub reason: Reason,
    pub analysis: u64,
    pub analysis_id: String,
    pub limit: Option<u64>,
    pub escalate_at: Instant,
    pub dry_run: bool,
    pub scope: Scope,
    /// When the violation was seen.
    time: String,
    targets: BTreeMap<u32, Target>,
}

impl KillJob {
    pub fn new(
        scope: Scope,
        reason: Reason,
        analysis: u64,
        analysis_id: &str,
        limit: Option<u64>,
        grace: std::time::Duration,
        dry_run: bool,
    ) -> Self {
        Self {
            reason,
            analysis,
            analysis_id: analysis_id.to_string(),
            limit,
            escalate_at: Instant::now() + grace,
            dry_run,
            scope,
            time: now_rfc3339(),
            targets: BTreeMap::new(),
        }
    }

    pub fn has_target(&self, pid: u32) -> bool {
        self.targets.contains_key(&pid)
    }

    /// Whether a child forked by `ppid` in `analysis` belongs to this kill.
    pub fn takes_child(&self, ppid: u32, analysis: u64) -> bool {
        match self.scope {
            Scope::Process => false,
            Scope::Subtree => self.has_target(ppid),
            Scope::Analysis => analysis == self.analysis,
        }
    }

    /// Seconds of grace left, when the grace is still running.
    pub fn grace_left_ms(&self) -> Option<u64> {
        let left = self.escalate_at.checked_duration_since(Instant::now())?;
        Some(crate::policy::millis(left))
    }

    pub fn target_pending(&self, pid: u32) -> bool {
        self.targets.get(&pid).is_some_and(|t| !t.done)
    }

    fn escalated(&self) -> bool {
        Instant::now() >= self.escalate_at
    }

    /// Adds a process and signals it at once: SIGTERM, or SIGKILL if the grace is over
    /// (a process forked while its tree is dying gets no grace of its own).
    pub fn add(&mut self, info: TargetInfo) {
        if self.targets.contains_key(&info.pid) {
            return;
        }
        let pid = info.pid;
        // The last line of defence: whatever the caller's bookkeeping says, these are
        // never signalled.
        if pid <= 1
            || pid == std::process::id()
            || procs::read(pid).is_some_and(|p| p.kernel_thread)
        {
            tracing::error!(
                pid,
                "refusing to signal init, the daemon or a kernel thread"
            );
            return;
        }
        let pidfd = PidFd::open_verified(pid, info.start_ns);
        let proc_text =
            |file: &str| std::fs::read(format!("/proc/{pid}/{file}")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&proc_text("cmdline"))
            .replace('\0', " ")
            .trim()
            .to_string();
        let uid = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.uid())
            .unwrap_or(0);
        let mut target = Target {
            runtime_ms: procs::boottime_ns().saturating_sub(info.start_ns) / 1_000_000,
            info,
            rss_bytes: procs::rss_bytes(pid),
            cmdline,
            uid,
            pidfd,
            signals: Vec::new(),
            sigkilled: false,
            done: false,
        };
        let signal = if self.escalated() {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        self.signal(&mut target, signal);
        self.targets.insert(pid, target);
    }

    fn signal(&self, target: &mut Target, signal: Signal) {
        let Some(pidfd) = &target.pidfd else {
            target.done = true;
            return;
        };
        if self.dry_run {
            tracing::warn!(
                pid = target.info.pid,
                ?signal,
                reason = self.reason.as_str(),
                "dry run: would signal"
            );
            target.done = true;
            return;
        }
        match pidfd.signal(signal) {
            Ok(()) => {
                target.signals.push(SignalSent {
                    signal: format!("{signal}"),
                    at: now_rfc3339(),
                });
                target.sigkilled |= signal == Signal::SIGKILL;
            }
            // ESRCH: it exited between our checks: nothing to do, nobody else hit.
            Err(err) => {
                tracing::debug!(pid = target.info.pid, "signal not delivered: {err}");
                target.done = true;
            }
        }
    }

    /// Marks exited targets, SIGKILLs the rest once the grace is over. True when every
    /// target is done.
    pub fn advance(&mut self) -> bool {
        let escalate = self.escalated() && !self.dry_run;
        let pids: Vec<u32> = self.targets.keys().copied().collect();
        for pid in pids {
            let mut target = self.targets.remove(&pid).expect("listed");
            if !target.done && target.pidfd.as_ref().is_some_and(PidFd::exited) {
                target.done = true;
            }
            if !target.done && escalate && !target.sigkilled {
                self.signal(&mut target, Signal::SIGKILL);
            }
            self.targets.insert(pid, target);
        }
        self.targets.values().all(|t| t.done)
    }

    /// (pid, start time) of every process this job signalled.
    pub fn signalled(&self) -> Vec<(u32, u64)> {
        self.targets
            .values()
            .filter(|t| !t.signals.is_empty())
            .map(|t| (t.info.pid, t.info.start_ns))
            .collect()
    }

    /// The records of a finished job, one per target.
    pub fn records(&self, host: &str) -> Vec<KillRecord> {
        self.targets
            .values()
            .map(|t| KillRecord {
                time: self.time.clone(),
                host: host.to_string(),
                pid: t.info.pid,
                ppid: t.info.ppid,
                analysis_id: self.analysis_id.clone(),
                reason: self.reason,
                limit: self.limit,
                rss_bytes: t.rss_bytes,
                runtime_ms: t.runtime_ms,
                signals: t.signals.clone(),
                outcome: match () {
                    _ if self.dry_run => Outcome::DryRun,
                    _ if t.pidfd.is_none() || t.signals.is_empty() => Outcome::AlreadyGone,
                    _ if t.sigkilled => Outcome::Killed,
                    _ => Outcome::ExitedAfterSigterm,
                },
                comm: t.info.comm.clone(),
                cmdline: t.cmdline.clone(),
                uid: t.uid,
            })
            .collect()
    }
}
