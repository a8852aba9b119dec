//! Kill jobs, as the rules see them: which processes a kill covers, which signal each
//! gets when (SIGTERM, the grace, SIGKILL), when the kill is over, and its records.
//! No I/O: `effects` sends the signals (through pidfds) and reports failures back.

use crate::vocab::{
    record::{KillRecord, Outcome, ShmLeft, SignalSent},
    units::rfc3339,
};
use std::{
    collections::BTreeMap,
    time::{Instant, SystemTime},
};

use nix::sys::signal::Signal;

use crate::vocab::{limits::Reason, process::ProcRef};

/// What the core knows of a target when the kill starts. Its command line and owner
/// are not read by the core: the effects read them, before the first signal (a dead
/// process has no cmdline), and hand them back ([`KillJob::describe`]).
#[derive(Clone, Debug)]
pub struct TargetInfo {
    pub process: ProcRef,
    pub ppid: u32,
    pub comm: String,
    pub cmdline: String,
    pub uid: u32,
    pub rss_bytes: u64,
    pub runtime_ms: u64,
}

struct Target {
    info: TargetInfo,
    signals: Vec<SignalSent>,
    sigkilled: bool,
    /// Exited (the tree took in its exit) or could not be signalled: nothing more to do.
    done: bool,
    /// Its command line, owner and RSS came back from the effects: its record is whole.
    described: bool,
    /// Unregistered while it was being killed: let go, never signalled again.
    released: bool,
    /// Its SIGTERM is kept pinned (sent by this kill, or by an earlier daemon's).
    progress_saved: bool,
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

/// Whether a job signals, or only records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Signal,
    /// `--dry-run`: recorded as what would have been signalled.
    DryRun,
    /// Orphan policy `log`: recorded, never signalled.
    LogOnly,
}

/// A signal the job wants sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalOrder {
    pub target: ProcRef,
    pub signal: Signal,
    /// A target's first signal: its command line, owner and RSS are read first, and
    /// handed back to the core with the signal's fate.
    pub describe: bool,
}

/// A target's SIGTERM sent before its kill began: by an earlier daemon (its grace
/// goes on), or by the kernel the moment the target crossed its memory limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EarlierSigterm {
    pub at: SystemTime,
    pub by_kernel: bool,
}

/// What a new target asks of the effects: its first signal (with its description), or,
/// from a job that signals nothing, its description alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstAsk {
    Signal(SignalOrder),
    Describe(ProcRef),
}

/// A kill in progress: its targets, and when the grace ends.
pub struct KillJob {
    pub reason: Reason,
    pub analysis: u64,
    pub analysis_id: String,
    /// Uid of the analysis' owner, for the records.
    pub owner_uid: Option<u32>,
    pub limit: Option<u64>,
    /// Reason `zombies`: how many unreaped children the target held.
    pub zombies: Option<u64>,
    /// Reason `tree_memory`: the analysis' PSS sum and RSS sum when it crossed.
    pub tree_sums: Option<(u64, u64)>,
    /// Reasons `memory` and `tree_memory`: what of the memory measured was in tmpfs
    /// files, outside every RSS.
    pub shmem_bytes: Option<u64>,
    /// The analysis' registered roots when the kill began (a root that exits leaves
    /// the registry before the kill's records are made).
    pub roots: Vec<u32>,
    pub escalate_at: Instant,
    escalated: bool,
    pub mode: Mode,
    pub scope: Scope,
    /// When the violation was seen.
    time: SystemTime,
    targets: BTreeMap<u32, Target>,
    /// Targets not done yet: "is the kill over?" is asked after every event.
    pending: usize,
    /// Targets whose description has not come back yet: their records wait for it.
    undescribed: usize,
}

/// Who and what a new job is about.
pub struct JobSpec {
    pub scope: Scope,
    pub reason: Reason,
    pub analysis: u64,
    pub analysis_id: String,
    pub owner_uid: Option<u32>,
    pub limit: Option<u64>,
    /// Reason `zombies`: how many unreaped children the target held.
    pub zombies: Option<u64>,
    pub grace: std::time::Duration,
    pub mode: Mode,
}

impl KillJob {
    pub fn new(spec: JobSpec, now: Instant, now_wall: SystemTime) -> Self {
        Self {
            reason: spec.reason,
            analysis: spec.analysis,
            analysis_id: spec.analysis_id,
            owner_uid: spec.owner_uid,
            limit: spec.limit,
            zombies: spec.zombies,
            tree_sums: None,
            shmem_bytes: None,
            roots: Vec::new(),
            escalate_at: now + spec.grace,
            escalated: false,
            mode: spec.mode,
            scope: spec.scope,
            time: now_wall,
            targets: BTreeMap::new(),
            pending: 0,
            undescribed: 0,
        }
    }

    /// Whether it kills `pid` (a log-only job, which only waits for its records'
    /// descriptions, covers nothing).
    pub fn has_target(&self, pid: u32) -> bool {
        self.mode != Mode::LogOnly && self.targets.contains_key(&pid)
    }

    /// Whether a child forked by `ppid` in `analysis` belongs to this kill.
    pub fn takes_child(&self, ppid: u32, analysis: u64) -> bool {
        if self.mode == Mode::LogOnly {
            return false;
        }
        match self.scope {
            Scope::Process => false,
            Scope::Subtree => self.has_target(ppid),
            Scope::Analysis => analysis == self.analysis,
        }
    }

    /// Ms of grace left, while the grace is still running.
    pub fn grace_left_ms(&self, now: Instant) -> Option<u64> {
        let left = self.escalate_at.checked_duration_since(now)?;
        Some(crate::vocab::units::millis(left))
    }

    pub fn target_pending(&self, pid: u32) -> bool {
        self.targets.get(&pid).is_some_and(|t| !t.done)
    }

    /// When this job next needs the clock: the end of its grace.
    pub fn wakeup(&self) -> Option<Instant> {
        (!self.escalated && self.mode == Mode::Signal).then_some(self.escalate_at)
    }

    /// Adds a process; returns what it asks of the effects now (None when it was a
    /// target already): its first signal, SIGTERM, or SIGKILL once the grace is over
    /// (a process forked while its tree is dying gets no grace of its own), with its
    /// description. A dry run or a log-only job signals nothing and is done with it at
    /// once, but for its description. A target sent SIGTERM before (`earlier_sigterm`:
    /// by an earlier daemon, or by the kernel) gets none again: its SIGKILL, when the
    /// grace is over.
    pub fn add(
        &mut self,
        info: TargetInfo,
        now: Instant,
        now_wall: SystemTime,
        earlier_sigterm: Option<EarlierSigterm>,
    ) -> Option<FirstAsk> {
        let pid = info.process.pid;
        if self.targets.contains_key(&pid) {
            return None;
        }
        let process = info.process;
        let mut target = Target {
            info,
            signals: Vec::new(),
            sigkilled: false,
            done: self.mode != Mode::Signal,
            described: false,
            released: false,
            progress_saved: false,
        };
        let ask = if self.mode == Mode::Signal {
            if let Some(earlier) = earlier_sigterm {
                Self::note_signal(&mut target, Signal::SIGTERM, earlier.at);
                if earlier.by_kernel
                    && let Some(sent) = target.signals.last_mut()
                {
                    sent.by = Some("kernel".into());
                }
                target.progress_saved = true;
                self.time = self.time.min(earlier.at);
            }
            let signal = if now >= self.escalate_at {
                Some(Signal::SIGKILL)
            } else {
                earlier_sigterm.is_none().then_some(Signal::SIGTERM)
            };
            match signal {
                Some(signal) => {
                    Self::note_signal(&mut target, signal, now_wall);
                    target.progress_saved |= signal == Signal::SIGTERM;
                    FirstAsk::Signal(SignalOrder {
                        target: process,
                        signal,
                        describe: true,
                    })
                }
                // Its SIGTERM went out before: only its description is read now, and
                // the grace it began ([`Self::resume_grace`]) is the one that ends.
                None => FirstAsk::Describe(process),
            }
        } else {
            FirstAsk::Describe(process)
        };
        self.pending += usize::from(!target.done);
        self.undescribed += 1;
        self.targets.insert(pid, target);
        Some(ask)
    }

    /// The effects read what a record tells of `process` (before its first signal):
    /// its record is whole now. A target described after the grace is over gets its
    /// SIGKILL now (returned): the grace's SIGKILL waited for its first signal.
    pub fn describe(
        &mut self,
        process: ProcRef,
        details: &crate::core::procs::Details,
        now_wall: SystemTime,
    ) -> Option<SignalOrder> {
        let target = self.targets.get_mut(&process.pid)?;
        if target.info.process != process || std::mem::replace(&mut target.described, true) {
            return None;
        }
        self.undescribed -= 1;
        // A target gone before /proc was read keeps what the kernel read of it, if any.
        if !details.cmdline.is_empty() || target.info.cmdline.is_empty() {
            target.info.cmdline.clone_from(&details.cmdline);
            target.info.uid = details.uid;
        }
        target.info.rss_bytes = target.info.rss_bytes.max(details.rss_bytes);
        if !self.escalated || target.done || target.sigkilled {
            return None;
        }
        Self::note_signal(target, Signal::SIGKILL, now_wall);
        Some(SignalOrder {
            target: process,
            signal: Signal::SIGKILL,
            describe: false,
        })
    }

    fn mark_done(target: &mut Target, pending: &mut usize) {
        if !std::mem::replace(&mut target.done, true) {
            *pending -= 1;
        }
    }

    fn note_signal(target: &mut Target, signal: Signal, at: SystemTime) {
        target.signals.push(SignalSent {
            signal: format!("{signal}"),
            at: rfc3339(at),
            by: None,
        });
        target.sigkilled |= signal == Signal::SIGKILL;
    }

    /// A target's SIGTERM came from an earlier daemon, whose grace ends at `escalate_at`:
    /// this kill's grace ends then too, if that is sooner.
    pub fn resume_grace(&mut self, escalate_at: Instant) {
        if !self.escalated {
            self.escalate_at = self.escalate_at.min(escalate_at);
        }
    }

    /// The targets whose SIGTERM is kept pinned: their entries go with the kill.
    pub fn saved_progress(&self) -> impl Iterator<Item = ProcRef> + '_ {
        self.targets
            .values()
            .filter(|t| t.progress_saved)
            .map(|t| t.info.process)
    }

    /// Whether the grace is over and its SIGKILLs went out.
    pub fn escalated(&self) -> bool {
        self.escalated
    }

    /// Once the grace is over: SIGKILL for every target still alive (once).
    pub fn escalate(&mut self, now: Instant, now_wall: SystemTime) -> Vec<SignalOrder> {
        if self.escalated || self.mode != Mode::Signal || now < self.escalate_at {
            return Vec::new();
        }
        self.escalated = true;
        let mut orders = Vec::new();
        for target in self.targets.values_mut() {
            // One not yet described has not had its first signal yet: its SIGKILL comes
            // with its description.
            if !target.done && !target.sigkilled && target.described {
                Self::note_signal(target, Signal::SIGKILL, now_wall);
                orders.push(SignalOrder {
                    target: target.info.process,
                    signal: Signal::SIGKILL,
                    describe: false,
                });
            }
        }
        orders
    }

    /// The signal could not be delivered (the process was already gone, or its pid
    /// names another process now): the target is done, with no signal recorded.
    pub fn signal_failed(&mut self, process: ProcRef, signal: Signal) {
        let Some(target) = self.targets.get_mut(&process.pid) else {
            return;
        };
        if target.info.process != process {
            return;
        }
        let name = format!("{signal}");
        if let Some(at) = target.signals.iter().rposition(|s| s.signal == name) {
            target.signals.remove(at);
        }
        target.sigkilled &= signal != Signal::SIGKILL;
        Self::mark_done(target, &mut self.pending);
    }

    /// The tree took in the target's exit: done with it. True when it was a target.
    pub fn exited(&mut self, process: ProcRef) -> bool {
        match self.targets.get_mut(&process.pid) {
            Some(target) if target.info.process == process => {
                Self::mark_done(target, &mut self.pending);
                true
            }
            _ => false,
        }
    }

    /// `process` was unregistered while this job killed it: it is let go alive, and
    /// its record says so. True when it was a target still being killed.
    pub fn release(&mut self, process: ProcRef) -> bool {
        match self.targets.get_mut(&process.pid) {
            Some(target) if target.info.process == process && !target.done => {
                target.released = true;
                Self::mark_done(target, &mut self.pending);
                true
            }
            _ => false,
        }
    }

    /// The targets not done yet.
    pub fn pending_pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.targets
            .iter()
            .filter(|(_, t)| !t.done)
            .map(|(pid, _)| *pid)
    }

    pub fn pending_count(&self) -> usize {
        self.pending
    }

    /// Every target has exited (or could not be signalled) and is described.
    pub fn is_done(&self) -> bool {
        self.pending == 0 && self.undescribed == 0
    }

    /// The targets signalled and not yet done (their pidfds are still needed).
    pub fn signalled(&self) -> impl Iterator<Item = ProcRef> + '_ {
        self.targets
            .values()
            .filter(|t| !t.signals.is_empty())
            .map(|t| t.info.process)
    }

    /// The records of a finished job, one per target; what the analysis left in tmpfs
    /// (`shm_left`) on its roots' records, or on the first if none was a target.
    pub fn records(&self, host: &str, shm_left: Vec<ShmLeft>) -> Vec<KillRecord> {
        let time = rfc3339(self.time);
        let holder = self
            .targets
            .keys()
            .copied()
            .find(|pid| self.roots.contains(pid))
            .or_else(|| self.targets.keys().copied().next());
        self.targets
            .values()
            .map(|t| KillRecord {
                time: time.clone(),
                host: host.to_string(),
                pid: t.info.process.pid,
                ppid: t.info.ppid,
                analysis_id: self.analysis_id.clone(),
                reason: self.reason,
                limit: self.limit,
                rss_bytes: t.info.rss_bytes,
                runtime_ms: t.info.runtime_ms,
                signals: t.signals.clone(),
                outcome: match self.mode {
                    Mode::DryRun => Outcome::DryRun,
                    Mode::LogOnly => Outcome::Logged,
                    Mode::Signal if t.released => Outcome::Released,
                    Mode::Signal if t.signals.is_empty() => Outcome::AlreadyGone,
                    Mode::Signal if t.sigkilled => Outcome::Killed,
                    Mode::Signal => Outcome::ExitedAfterSigterm,
                },
                comm: t.info.comm.clone(),
                cmdline: t.info.cmdline.clone(),
                uid: t.info.uid,
                owner_uid: self.owner_uid,
                warned_of: None,
                zombies: self.zombies,
                tree_pss_bytes: self.tree_sums.map(|(pss, _)| pss),
                tree_rss_bytes: self.tree_sums.map(|(_, rss)| rss),
                shmem_bytes: self.shmem_bytes,
                shm_left: if self.roots.contains(&t.info.process.pid)
                    || holder == Some(t.info.process.pid)
                {
                    shm_left.clone()
                } else {
                    Vec::new()
                },
                refused_forks: None,
            })
            .collect()
    }
}
