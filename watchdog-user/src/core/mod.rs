//! The rules core, sans I/O: a state machine fed kernel events, requests, poll results
//! and the clock, which answers with [`Action`]s (watch this, signal that, record
//! this) for `effects` to carry out. It reads /proc only through [`Procs`] and the
//! time only from the [`Clock`] it is given, so every rule is unit-tested here with a
//! fake /proc and a fake clock, without a kernel.
//!
//! The rules: a timeout or a tree-memory crossing kills the whole analysis; a process
//! over its memory limit is killed alone; a process whose parent dies while it lives
//! on is an orphan, killed with its subtree or only recorded, by its analysis' policy.
//! A kill is SIGTERM, the grace, then SIGKILL; processes forked into a dying scope
//! join it at once, and a dying analysis kills whatever later appears in it.
//!
//! Who may ask for what: root and the admin group anything; anyone else may watch and
//! unwatch only processes running as itself (real uid), in analyses it created
//! ([`Core::check_register`], [`Core::check_descendants`], [`Core::unregister`]).

pub mod event;
pub mod kill;
pub mod procs;
pub mod registry;
pub mod rules;
pub mod snapshot;
pub mod tree;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, bail};
use watchdog_common::{AnalysisEntry, RootEntry};

use crate::{
    core::event::KernelEvent,
    core::{
        kill::{JobSpec, KillJob, Mode, Scope, SignalOrder, TargetInfo},
        procs::{ProcInfo, Procs},
        registry::{Registry, Root},
        rules::zombies::{Zombie, Zombies},
        snapshot::{AnalysisBrief, ProcessBrief, ProcessSnapshot},
        tree::{Node, Tree},
    },
    vocab::{
        limits::{LimitOverrides, Limits, OrphanPolicy, Reason},
        peer::Peer,
        process::{AnalysisKey, Comm, ProcRef, same_start},
        record::{KillRecord, Outcome},
    },
};

/// Longest analysis id accepted: ids are labels, not payloads.
pub const MAX_ANALYSIS_ID: usize = watchdog_common::ANALYSIS_ID_MAX;
/// Records kept in memory for `status` (the database keeps them all).
const RECORDS_KEPT: usize = 10_000;
/// How long a killed analysis is kept once empty: a member whose fork event was lost
/// comes back with the next resync (the loss check runs every 200 ms) and is killed,
/// instead of finding its analysis forgotten and escaping.
pub const DYING_LINGER: Duration = Duration::from_secs(1);
/// When a parent's children are looked at again, one after another, while /proc does
/// not show them reparented yet: the exit event is sent before the kernel reparents,
/// which usually follows within a millisecond but waits for the parent's memory to be
/// torn down. Doubling keeps the usual case fast and the whole wait (31 ms) longer than
/// one fixed recheck of 20 ms was; after the last look the child is judged as it is.
const REPARENT_LOOKS: [Duration; 5] = [
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
];
/// How long the kernel may take to hand a dead parent's children (and zombies) on.
const REPARENT_WINDOW: Duration = Duration::from_millis(31);
/// With an analysis over its tree limit by RSS but not by PSS, the PSS is measured
/// again once the RSS sum grows by this part of the limit (and at every poll).
const PSS_REMEASURE_PART: u64 = 32;

/// Analyses whose RSS sum had crossed one level of their tree limit (the limit, or its
/// warning level) while their PSS sum had not: the RSS sum at that measure.
#[derive(Default)]
struct PssUnder(HashMap<AnalysisKey, u64>);

impl PssUnder {
    /// Asked once the RSS sum (`sum`, an upper bound: it counts a page shared by N
    /// processes N times) has crossed a level: the PSS sum, which counts it once, when
    /// it has `reached` the level too. PSS is a walk of each address space, so after a
    /// measure found it under, it is measured again only once the RSS sum has grown by
    /// `limit / PSS_REMEASURE_PART` (or the poll forgot the measure).
    fn reaches(
        &mut self,
        key: AnalysisKey,
        sum: u64,
        limit: u64,
        reached: impl Fn(u64) -> bool,
        tree: &Tree,
        procs: &dyn Procs,
    ) -> Option<u64> {
        let measured_at = self.0.get(&key).copied();
        if measured_at.is_some_and(|at| sum < at.saturating_add(limit / PSS_REMEASURE_PART)) {
            return None;
        }
        let pss: u64 = tree
            .members(key)
            .into_iter()
            .map(|pid| procs.pss_bytes(pid).unwrap_or(0))
            .sum();
        if reached(pss) {
            self.0.remove(&key);
            return Some(pss);
        }
        tracing::debug!(key, rss_sum = sum, pss, limit, "under by PSS: shared pages");
        self.0.insert(key, sum);
        None
    }

    fn forget(&mut self, key: AnalysisKey) {
        self.0.remove(&key);
    }
}
/// How often the zombies known are looked at again in /proc while there are any: the
/// kernel says when a process exits, not when its parent reaps it.
const ZOMBIE_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long after an exit its parent is asked whether it reaped it: long enough for
/// the kernel to have made it a zombie (the exit event comes first) and for a parent
/// that waits at once to have reaped it.
const ZOMBIE_SETTLE: Duration = Duration::from_millis(20);

/// The time, as the driver read it once for this input.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub now: Instant,
    pub wall: SystemTime,
    /// CLOCK_BOOTTIME ns: the clock of start times and kernel timestamps.
    pub boot_ns: u64,
}

impl Clock {
    pub fn read() -> Self {
        Self {
            now: Instant::now(),
            wall: SystemTime::now(),
            boot_ns: crate::vocab::process::boottime_ns(),
        }
    }

    /// The same clock `by` later (tests drive time with this).
    pub fn advanced(&self, by: Duration) -> Self {
        Self {
            now: self.now + by,
            wall: self.wall + by,
            boot_ns: self.boot_ns + crate::vocab::units::millis(by) * 1_000_000,
        }
    }
}

/// The refusal of what only root and the admin group may do (test faults), to a caller
/// that is neither ([`Core::is_admin`]).
pub fn admin_only(caller: &Peer, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "refused by rule admin-only: {what} is for root and members of the admin group \
         (--admin-group), and you are uid {}",
        caller.uid
    )
}

/// What the rules ask the outside world to do.
#[derive(Debug)]
pub enum Action {
    /// Take the process out of the kernel's watched map.
    Unwatch(ProcRef),
    /// Keep the analysis in the kernel (pinned) map, for a restarted daemon.
    SaveAnalysis(AnalysisKey, Box<AnalysisEntry>),
    /// The analysis is over: drop it and its roots from the kernel maps.
    ForgetAnalysis(AnalysisKey, Vec<u32>),
    SaveRoot(u32, RootEntry),
    /// Tell the rules (`Core::on_launcher_exit`) when `launcher` exits.
    WatchLauncher {
        root: ProcRef,
        launcher: ProcRef,
    },
    /// Send this signal, to this process only (never to a recycled pid); report a
    /// failure with `Core::on_signal_failed`.
    Signal(SignalOrder),
    /// A finished kill no longer needs a handle on this process.
    Release(ProcRef),
    /// A finished violation or kill: log it, spool it, store it.
    Record(Box<KillRecord>),
}

/// Why the tree is rebuilt from the kernel map; only a repair after lost events counts
/// as a resync in `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    Start,
    Restart,
    LostEvents,
}

/// What can change while running (SIGHUP), and the facts of the machine they apply to.
#[derive(Clone, Debug)]
pub struct Settings {
    pub defaults: Limits,
    pub dry_run: bool,
    /// The machine's total memory, bytes (read once at start; None if unreadable): no
    /// process' RSS can exceed it, so a per-process limit above it is refused.
    pub machine_memory: Option<u64>,
    /// Members of this group (`--admin-group`) may do everything root may.
    pub admin_gid: Option<u32>,
    /// What the per-process limit compares (the tree limit always counts PSS).
    pub memory_metric: crate::vocab::limits::MemoryMetric,
}

impl Settings {
    /// Why the default per-process memory limit can never be reached here, if it
    /// cannot: the daemon warns at start and on reload (it is not refused: analyses
    /// keep it, unenforceable, unless they pass a limit of their own).
    pub fn unreachable_default(&self) -> Option<String> {
        let total = self.machine_memory?;
        let limit = self.defaults.memory_bytes;
        (limit > total).then(|| {
            format!(
                "the default memory limit {} is more than this machine's {}: it can never \
                 be reached, so analyses that keep it have no memory limit; set \
                 --default-memory to at most {}",
                crate::vocab::units::size_rounded(limit, true),
                crate::vocab::units::size_rounded(total, false),
                crate::vocab::units::size_rounded(total, false),
            )
        })
    }

    /// Refuses a per-process memory limit asked for above the machine's memory: no
    /// process could reach it, so it would watch nothing. (The tree limit is not
    /// checked: RSS summed over processes counts the pages they share once per process,
    /// e.g. after fork, so the sum can exceed the machine's memory.)
    fn check_reachable(&self, overrides: &LimitOverrides) -> Result<()> {
        let (Some(total), Some(limit)) = (self.machine_memory, overrides.memory_bytes) else {
            return Ok(());
        };
        if limit > total {
            let at_most = crate::vocab::units::size_rounded(total, false);
            bail!(
                "the memory limit {} is more than this machine's {at_most}: it could never \
                 be reached; use at most {at_most} (nothing was registered)",
                crate::vocab::units::size_rounded(limit, true),
            );
        }
        Ok(())
    }
}

#[derive(Default, Clone, Debug)]
pub struct Counters {
    pub forks: u64,
    pub exits: u64,
    pub execs: u64,
    pub resyncs: u64,
    pub rss_reports: u64,
    /// Processes recorded as killed (or would-be killed in a dry run).
    pub kills: u64,
    pub kills_by_reason: BTreeMap<&'static str, u64>,
    /// Children the kernel map could not take, followed by the rules instead.
    pub untracked_forks: u64,
}

/// A registration that passed every check, ready for `effects` to put its processes
/// in the kernel map and for [`Core::adopt`] to take them in.
#[derive(Debug)]
pub struct Registration {
    pub root: ProcInfo,
    pub analysis_id: String,
    pub key: AnalysisKey,
    pub new_analysis: bool,
    pub limits: Limits,
    pub launcher: Option<ProcInfo>,
    /// Uid of the caller: the owner of the analysis, when this creates it.
    pub owner: u32,
    /// The only uid whose processes this registration may watch (the caller's), or
    /// None for root and the admin group: every descendant the walk finds is checked.
    pub confined_to: Option<u32>,
}

/// A registration taken in: its root, its analysis, and how many processes that
/// analysis has now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub pid: u32,
    pub analysis_id: String,
    pub watched: usize,
}

/// What a registration needs of the outside world.
pub trait Watch {
    /// The root's existing descendants (checked for a confined caller first).
    fn descendants(&mut self, root: ProcRef) -> Result<Vec<ProcRef>>;

    /// Puts a checked registration's processes in the kernel map (`fresh`: the root was
    /// just started and has no descendants; `permit` checks each process as it is
    /// watched) and returns those verified to be watched.
    fn watch(
        &mut self,
        registration: &Registration,
        fresh: bool,
        analysis_of: &dyn Fn(u32) -> Option<AnalysisKey>,
        permit: &dyn Fn(ProcRef) -> Result<()>,
    ) -> Result<Vec<ProcInfo>>;
}

pub struct Core {
    tree: Tree,
    registry: Registry,
    jobs: Vec<KillJob>,
    settings: Settings,
    counters: Counters,
    /// Finished violations and kills, newest last (bounded).
    recent: VecDeque<KillRecord>,
    host: String,
    self_pid: u32,
    actions: Vec<Action>,
    /// The tree changed since `watchdog_processes` was last brought up to date.
    processes_dirty: bool,
    /// CLOCK_BOOTTIME of the last resync: fork events from before it may describe
    /// processes whose exits were lost.
    resynced_at_ns: u64,
    /// Killed analyses with no member left, and when they are forgotten.
    lingering: BTreeMap<AnalysisKey, Instant>,
    /// Children of a dead parent that /proc did not yet show reparented: when to look
    /// again, and how many looks were taken. Until then nobody can tell adopted from
    /// orphaned.
    reparent_checks: BTreeMap<u32, (Instant, usize)>,
    /// Analyses over their tree limit by RSS but not by PSS.
    pss_under: PssUnder,
    /// The same for the tree limit's warning level (see [`Core::warn`]).
    pss_under_warning: PssUnder,
    /// Processes the kernel map could not take (full, or out of memory), by pid: in
    /// the tree, but the kernel reports neither their forks nor their exit, so they
    /// are handed back to the map as soon as it has room (see [`Core::untracked`]).
    untracked: BTreeMap<u32, ProcRef>,
    /// Exited members not yet reaped by the watched process that holds them.
    zombies: Zombies,
    /// Members that exited since the last sweep, their watched parent not yet asked
    /// whether it reaped them.
    exited_unchecked: Vec<Zombie>,
    /// When the zombies are next looked at again in /proc.
    zombie_sweep_at: Option<Instant>,
}

/// What became of an attempt to hand an untracked process back to the kernel map.
#[derive(Debug)]
pub enum Retrack {
    /// In the map now, with the descendants it forked meanwhile (also in the map).
    Watched(Vec<ProcInfo>),
    /// The map still cannot take it: tried again later.
    NoRoom,
    /// It exited (or its pid names another process now).
    Gone,
}

impl Core {
    pub fn new(settings: Settings, host: String, self_pid: u32) -> Self {
        Self {
            tree: Tree::default(),
            registry: Registry::default(),
            jobs: Vec::new(),
            settings,
            counters: Counters::default(),
            recent: VecDeque::new(),
            host,
            self_pid,
            actions: Vec::new(),
            processes_dirty: true,
            resynced_at_ns: 0,
            lingering: BTreeMap::new(),
            reparent_checks: BTreeMap::new(),
            pss_under: PssUnder::default(),
            pss_under_warning: PssUnder::default(),
            untracked: BTreeMap::new(),
            zombies: Zombies::default(),
            exited_unchecked: Vec::new(),
            zombie_sweep_at: None,
        }
    }

    pub fn zombies(&self) -> &Zombies {
        &self.zombies
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn jobs(&self) -> &[KillJob] {
        &self.jobs
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// The analyses people see: not the killed ones lingering empty before they are
    /// forgotten.
    pub fn live_analyses(&self) -> impl Iterator<Item = (AnalysisKey, &registry::Analysis)> {
        self.registry
            .iter()
            .filter(|(key, _)| !self.lingering.contains_key(key))
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn recent(&self) -> &VecDeque<KillRecord> {
        &self.recent
    }

    pub fn resynced_at_ns(&self) -> u64 {
        self.resynced_at_ns
    }

    /// What the rules want done since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// When the rules next need the clock: the soonest deadline or end of a grace.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let graces = self.jobs.iter().filter_map(KillJob::wakeup);
        let lingering = self.lingering.values().copied();
        let rechecks = self.reparent_checks.values().map(|(at, _)| *at);
        self.registry
            .next_deadline()
            .into_iter()
            .chain(self.registry.next_warning())
            .chain(graces)
            .chain(lingering)
            .chain(rechecks)
            .chain(self.zombie_sweep_at)
            .min()
    }

    // ---- kernel events -------------------------------------------------------------

    pub fn on_event(&mut self, event: KernelEvent, procs: &dyn Procs, clock: &Clock) {
        match event {
            KernelEvent::Fork {
                pid,
                ppid,
                analysis,
                start_ns,
                comm,
                untracked,
                ..
            } => {
                let node = Node::new(pid, ppid, start_ns, comm, analysis);
                self.forked(node, untracked, procs, clock);
            }
            KernelEvent::Exit {
                pid,
                analysis,
                start_ns,
                ..
            } => {
                self.counters.exits += 1;
                self.exited(ProcRef { pid, start_ns }, procs, clock);
                self.forget_if_finished(analysis, clock);
            }
            KernelEvent::Rss { pid, rss_bytes, .. } => {
                self.counters.rss_reports += 1;
                self.rss_seen(pid, rss_bytes, procs, clock);
            }
            KernelEvent::Exec { pid, comm } => {
                self.counters.execs += 1;
                self.tree.set_comm(pid, comm);
            }
        }
        self.finish_done_jobs(clock);
    }

    fn forked(&mut self, node: Node, untracked: bool, procs: &dyn Procs, clock: &Clock) {
        self.counters.forks += 1;
        if self.registry.get(node.analysis).is_none() {
            // Forked while its analysis was being unregistered.
            if !untracked {
                self.actions.push(Action::Unwatch(node.proc_ref()));
            }
            return;
        }
        let (process, ppid, analysis) = (node.proc_ref(), node.ppid, node.analysis);
        self.insert(node);
        self.join_dying_scope(process.pid, ppid, analysis, procs, clock);
        self.check_process_count(analysis, procs, clock);
        if untracked {
            self.counters.untracked_forks += 1;
            self.untracked.insert(process.pid, process);
            self.make_room(procs, clock);
        }
    }

    /// A fork bomb is stopped from its fork events: more members than the analysis'
    /// `max_processes` and the whole analysis is killed.
    fn check_process_count(&mut self, key: AnalysisKey, procs: &dyn Procs, clock: &Clock) {
        let Some(max) = self.registry.get(key).map(|a| a.limits.max_processes) else {
            return;
        };
        if max != 0 && self.tree.member_count(key) as u64 > max {
            self.kill_analysis(key, Reason::MaxProcesses, Some(max), procs, clock);
        }
    }

    /// The kernel map could not take a process: the analysis holding the most of it is
    /// killed (unless it is being killed already, which frees room by itself), so one
    /// analysis filling the map never costs another its tracking. Like the OOM killer,
    /// the largest goes.
    fn make_room(&mut self, procs: &dyn Procs, clock: &Clock) {
        let largest = self
            .registry
            .iter()
            .map(|(key, analysis)| (self.tree.member_count(key), key, analysis.violation))
            .max_by_key(|(members, ..)| *members);
        let Some((members, key, None)) = largest else {
            return;
        };
        tracing::error!(
            analysis_id = self.registry.id(key).unwrap_or_default(),
            members,
            "the kernel's watched map is full: killing the analysis that holds the most of it"
        );
        self.kill_analysis(key, Reason::MapFull, None, procs, clock);
    }

    /// Marks an analysis violated and kills all its members, unless it was already.
    fn kill_analysis(
        &mut self,
        key: AnalysisKey,
        reason: Reason,
        limit: Option<u64>,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        if self.registry.mark_violated(key, reason, limit) {
            let pids = self.tree.members(key);
            self.start_kill(Scope::Analysis, reason, key, limit, &pids, procs, clock);
        }
    }

    /// Untracked processes to hand back to the kernel map: (process, analysis, its
    /// RSS levels).
    pub fn untracked(&self) -> Vec<(ProcRef, AnalysisKey, crate::vocab::limits::RssLevels)> {
        self.untracked
            .values()
            .filter_map(|process| {
                let key = self.tree.get(process.pid)?.analysis;
                let limit = self.registry.get(key)?.limits.rss_levels();
                Some((*process, key, limit))
            })
            .collect()
    }

    /// What the effects made of handing `process` back to the kernel map.
    pub fn retracked(
        &mut self,
        process: ProcRef,
        outcome: Retrack,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(key) = self.tree.get(process.pid).map(|n| n.analysis) else {
            self.untracked.remove(&process.pid);
            return;
        };
        match outcome {
            Retrack::NoRoom => return,
            Retrack::Watched(found) => {
                self.untracked.remove(&process.pid);
                tracing::info!(
                    pid = process.pid,
                    descendants = found.len(),
                    "an untracked process is in the kernel map again"
                );
                for info in found {
                    if self.tree.contains(info.pid) {
                        continue;
                    }
                    self.insert(node_of(&info, key));
                    self.join_dying_scope(info.pid, info.ppid, key, procs, clock);
                }
                self.check_process_count(key, procs, clock);
            }
            Retrack::Gone => {
                // No exit event comes for a process the kernel did not follow.
                self.untracked.remove(&process.pid);
                self.exited(process, procs, clock);
                self.forget_if_finished(key, clock);
            }
        }
        self.finish_done_jobs(clock);
    }

    fn insert(&mut self, node: Node) {
        if let Some(stale) = self.tree.insert(node) {
            self.left_tree(stale.proc_ref());
        }
        self.processes_dirty = true;
    }

    /// A new member of a dying scope joins its kill at once; one of an analysis whose
    /// kill is over (its fork event was still queued) gets a kill of its own.
    fn join_dying_scope(
        &mut self,
        pid: u32,
        ppid: u32,
        analysis: AnalysisKey,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        if let Some(at) = self.jobs.iter().position(|j| j.takes_child(ppid, analysis)) {
            self.lingering.remove(&analysis);
            let mut job = self.jobs.swap_remove(at);
            self.add_target(&mut job, pid, procs, clock);
            self.jobs.push(job);
        } else if let Some((reason, limit)) = self.registry.violation(analysis) {
            self.lingering.remove(&analysis);
            self.start_kill(
                Scope::Analysis,
                reason,
                analysis,
                limit,
                &[pid],
                procs,
                clock,
            );
        }
    }

    fn exited(&mut self, process: ProcRef, procs: &dyn Procs, clock: &Clock) {
        if !self.tree.holds(process) {
            return; // A recycled pid's older exit, or one the tree already let go.
        }
        let children: Vec<u32> = self.tree.children_of(process.pid).collect();
        if let Some(node) = self.remove(process.pid) {
            self.maybe_zombie(&node, clock);
        }
        for child in children {
            self.parent_gone(child, 0, procs, clock);
        }
        if self.zombies.held_by(process.pid) > 0 {
            // The kernel hands its zombies to init or a subreaper: looked at again once
            // it has.
            self.sweep_zombies_at(clock.now + REPARENT_WINDOW);
        }
    }

    /// Takes a process out of the tree, wherever it went (exit, resync, unregister):
    /// a kill waiting for it is done with it.
    fn remove(&mut self, pid: u32) -> Option<Node> {
        let node = self.tree.remove(pid)?;
        self.left_tree(node.proc_ref());
        self.processes_dirty = true;
        Some(node)
    }

    fn left_tree(&mut self, process: ProcRef) {
        for job in &mut self.jobs {
            job.exited(process);
        }
    }

    /// Forgets an analysis with no process and no kill left (a killed one only after
    /// [`DYING_LINGER`]).
    fn forget_if_finished(&mut self, key: AnalysisKey, clock: &Clock) {
        if self.tree.has_analysis(key) || self.jobs.iter().any(|j| j.analysis == key) {
            self.lingering.remove(&key);
            return;
        }
        if self.registry.violation(key).is_some() {
            let at = *self
                .lingering
                .entry(key)
                .or_insert(clock.now + DYING_LINGER);
            if clock.now < at {
                return;
            }
        }
        self.lingering.remove(&key);
        self.pss_under.forget(key);
        self.pss_under_warning.forget(key);
        if let Some(roots) = self.registry.forget(key) {
            self.actions.push(Action::ForgetAnalysis(key, roots));
        }
    }

    // ---- memory --------------------------------------------------------------------

    fn rss_seen(&mut self, pid: u32, rss_bytes: u64, procs: &dyn Procs, clock: &Clock) {
        let Some((analysis, sum)) = self.tree.set_rss(pid, rss_bytes) else {
            return;
        };
        self.check_process_memory(pid, procs, clock);
        self.check_tree_memory(analysis, sum, procs, clock);
    }

    /// The reconcile poll's findings: (process, RSS) of watched processes. Samples of a
    /// pid that now names another process are ignored.
    pub fn on_poll(&mut self, samples: &[(ProcRef, u64)], procs: &dyn Procs, clock: &Clock) {
        let mut analyses = HashSet::new();
        for &(process, rss) in samples {
            if !self.tree.holds(process) {
                continue;
            }
            if let Some((analysis, _)) = self.tree.set_rss(process.pid, rss) {
                self.check_process_memory(process.pid, procs, clock);
                analyses.insert(analysis);
            }
        }
        for key in analyses {
            // Writes to shared pages (copy-on-write) raise the PSS, not the RSS: the
            // poll measures again whatever is over its limit by RSS.
            self.pss_under.forget(key);
            self.pss_under_warning.forget(key);
            let sum = self.tree.rss_sum(key);
            self.check_tree_memory(key, sum, procs, clock);
        }
        self.sweep_zombies(procs, clock);
        self.finish_done_jobs(clock);
    }

    fn check_process_memory(&mut self, pid: u32, procs: &dyn Procs, clock: &Clock) {
        let Some(node) = self.tree.get(pid) else {
            return;
        };
        let analysis = node.analysis;
        let Some(limits) = self.registry.get(analysis).map(|a| &a.limits) else {
            return;
        };
        let (limit, warn_level) = (limits.memory_bytes, limits.warn_level(limits.memory_bytes));
        if let Some(level) = warn_level.filter(|&level| node.rss_bytes() >= level) {
            self.warn_of_process_memory(pid, level, limit, procs, clock);
        }
        let Some(node) = self.tree.get(pid) else {
            return;
        };
        if node.rss_bytes() <= limit || self.jobs.iter().any(|j| j.has_target(pid)) {
            return;
        }
        // RSS is an upper bound of PSS: only a crossing by RSS needs the PSS read.
        if self.settings.memory_metric == crate::vocab::limits::MemoryMetric::Pss
            && procs.pss_bytes(pid).is_none_or(|pss| pss <= limit)
        {
            return;
        }
        if !self.tree.mark_memory_violated(pid) {
            return;
        }
        self.start_kill(
            Scope::Process,
            Reason::Memory,
            analysis,
            Some(limit),
            &[pid],
            procs,
            clock,
        );
    }

    fn check_tree_memory(&mut self, key: AnalysisKey, sum: u64, procs: &dyn Procs, clock: &Clock) {
        let Some(limit) = self
            .registry
            .get(key)
            .and_then(|a| a.limits.tree_memory_bytes)
        else {
            return;
        };
        self.warn_of_tree_memory(key, sum, limit, procs, clock);
        // The RSS sum counts a page shared by N processes N times (a pool forked from
        // a parent holding its data): it is an upper bound, and only once it crosses
        // is the PSS sum, which counts every page once, measured and compared.
        if sum <= limit || self.registry.violation(key).is_some() {
            return;
        }
        let Some(pss) =
            self.pss_under
                .reaches(key, sum, limit, |pss| pss > limit, &self.tree, procs)
        else {
            return;
        };
        let analysis_id = self.registry.id(key).unwrap_or_default().to_string();
        tracing::warn!(
            analysis_id,
            pss,
            rss_sum = sum,
            limit,
            "tree memory limit crossed"
        );
        self.kill_analysis(key, Reason::TreeMemory, Some(limit), procs, clock);
    }

    // ---- zombies -------------------------------------------------------------------

    /// A member exited: while its pid still names it, the parent that has not reaped
    /// it holds a zombie. Only a watched parent's zombies are counted (one held outside
    /// the analysis, by the shell that registered a root, is nobody's here to act on).
    /// Looked at in /proc a moment later, with the other exits of the moment: most are
    /// reaped by then, and one read of each parent's children tells which are not,
    /// instead of a read per exit on the event path.
    fn maybe_zombie(&mut self, node: &Node, clock: &Clock) {
        let Some(analysis) = self.tree.get(node.ppid).map(|p| p.analysis) else {
            return;
        };
        self.exited_unchecked.push(Zombie {
            process: node.proc_ref(),
            holder: node.ppid,
            analysis,
            comm: node.comm,
        });
        self.sweep_zombies_at(clock.now + ZOMBIE_SETTLE);
    }

    /// Looks at the zombies again no later than `at`.
    fn sweep_zombies_at(&mut self, at: Instant) {
        self.zombie_sweep_at = Some(self.zombie_sweep_at.map_or(at, |soonest| soonest.min(at)));
    }

    /// Looks at the exits of the moment and every zombie known in /proc: reaped ones
    /// are forgotten, those the kernel handed to another watched process (a subreaper
    /// of the analysis) move to it, those handed outside the analysis are forgotten
    /// (init's or another's to reap); then the holders' counts are checked.
    fn sweep_zombies(&mut self, procs: &dyn Procs, clock: &Clock) {
        self.zombie_sweep_at = None;
        let known: Vec<Zombie> = self.zombies.iter().cloned().collect();
        let mut holders: BTreeSet<u32> = known
            .into_iter()
            .filter_map(|zombie| self.track(zombie, procs))
            .collect();
        let mut exits: BTreeMap<u32, Vec<Zombie>> = BTreeMap::new();
        for zombie in std::mem::take(&mut self.exited_unchecked) {
            exits.entry(zombie.holder).or_default().push(zombie);
        }
        for (parent, exited) in exits {
            // A living parent's children list names its unreaped ones (zombies stay
            // on it until reaped); a dead parent's were handed on: each is looked at.
            let unreaped = self
                .tree
                .contains(parent)
                .then(|| procs.children(parent))
                .flatten();
            for zombie in exited {
                if unreaped
                    .as_ref()
                    .is_some_and(|listed| !listed.contains(&zombie.process.pid))
                {
                    continue;
                }
                holders.extend(self.track(zombie, procs));
            }
        }
        for holder in holders {
            let held = self.zombies.held_by(holder);
            self.check_zombies(holder, held, procs, clock);
        }
        if !self.zombies.is_empty() {
            self.sweep_zombies_at(clock.now + ZOMBIE_SWEEP_EVERY);
        }
    }

    /// A zombie (known, or just exited) looked at in /proc: kept under whichever
    /// watched process holds it now, or forgotten (reaped, or held outside the
    /// analyses). Returns its holder.
    fn track(&mut self, zombie: Zombie, procs: &dyn Procs) -> Option<u32> {
        self.zombies.remove(zombie.process.pid);
        let holder = procs.unreaped(zombie.process)?;
        let analysis = self.tree.get(holder)?.analysis;
        self.zombies.insert(Zombie {
            holder,
            analysis,
            ..zombie
        });
        Some(holder)
    }

    /// A process holding more zombies than its analysis allows is killed alone (its
    /// zombies go to init, or a subreaper, which reaps them), once; the record says how
    /// many it held. Its zombies are looked at again first: it may have reaped some.
    fn check_zombies(&mut self, holder: u32, held: usize, procs: &dyn Procs, clock: &Clock) {
        let Some(key) = self.tree.get(holder).map(|n| n.analysis) else {
            return;
        };
        let Some(max) = self.registry.get(key).map(|a| a.limits.max_zombies) else {
            return;
        };
        if max == 0
            || held as u64 <= max
            || self.registry.violation(key).is_some()
            || self.jobs.iter().any(|j| j.has_target(holder))
        {
            return;
        }
        let known: Vec<Zombie> = self.zombies.of_holder(holder).cloned().collect();
        for zombie in known {
            self.track(zombie, procs);
        }
        let held = self.zombies.held_by(holder) as u64;
        if held <= max {
            return;
        }
        let mode = self.kill_mode();
        let mut spec = self.job_spec(Scope::Process, Reason::Zombies, key, Some(max), mode);
        spec.zombies = Some(held);
        tracing::warn!(pid = holder, held, max, "a process holds too many zombies");
        self.start_job(spec, &[holder], procs, clock);
    }

    // ---- warnings ------------------------------------------------------------------

    /// A process' memory reached the warning's level of its limit (by RSS, or by PSS
    /// under `--memory-metric pss`, as the limit itself is compared).
    fn warn_of_process_memory(
        &mut self,
        pid: u32,
        level: u64,
        limit: u64,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(key) = self.tree.get(pid).map(|n| n.analysis) else {
            return;
        };
        let warned = self
            .registry
            .get(key)
            .is_none_or(|a| a.warned.contains(&Reason::Memory) || a.violation.is_some());
        if warned
            || (self.settings.memory_metric == crate::vocab::limits::MemoryMetric::Pss
                && procs.pss_bytes(pid).is_none_or(|pss| pss < level))
        {
            return;
        }
        self.warn(key, Reason::Memory, limit, procs, clock);
    }

    /// The analysis' memory reached the warning's level of its tree limit: by the RSS
    /// sum first, then (as for the limit itself) by the PSS sum, which counts a shared
    /// page once.
    fn warn_of_tree_memory(
        &mut self,
        key: AnalysisKey,
        sum: u64,
        limit: u64,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(analysis) = self.registry.get(key) else {
            return;
        };
        let Some(level) = analysis.limits.warn_level(limit) else {
            return;
        };
        if sum < level
            || analysis.warned.contains(&Reason::TreeMemory)
            || analysis.violation.is_some()
        {
            return;
        }
        let reached =
            self.pss_under_warning
                .reaches(key, sum, limit, |pss| pss >= level, &self.tree, procs);
        if reached.is_some() {
            self.warn(key, Reason::TreeMemory, limit, procs, clock);
        }
    }

    /// Sends the warning signal to the analysis' living roots, once per limit (`of`),
    /// and records it (reason `warning`, outcome `warned`, the limit warned of). A
    /// dying analysis is warned of nothing. In a dry run it is recorded, not sent.
    fn warn(&mut self, key: AnalysisKey, of: Reason, limit: u64, procs: &dyn Procs, clock: &Clock) {
        if !self.registry.mark_warned(key, of) {
            return;
        }
        let Some(analysis) = self.registry.get(key) else {
            return;
        };
        let (signal, analysis_id, owner) = (
            analysis.limits.warn_signal(),
            analysis.id.clone(),
            analysis.owner,
        );
        let roots: Vec<Node> = analysis
            .roots
            .iter()
            .filter_map(|&pid| self.tree.get(pid))
            .filter(|node| node.analysis == key && node.pid > 1 && node.pid != self.self_pid)
            .cloned()
            .collect();
        if roots.is_empty() {
            tracing::info!(analysis_id, of = of.as_str(), "no living root to warn");
        }
        let at = crate::vocab::units::rfc3339(clock.wall);
        for root in roots {
            tracing::warn!(
                analysis_id,
                pid = root.pid,
                of = of.as_str(),
                signal = signal.as_str(),
                "warning: a limit is near"
            );
            let details = procs.details(root.pid);
            let outcome = if self.settings.dry_run {
                Outcome::DryRun
            } else {
                self.actions.push(Action::Signal(SignalOrder {
                    target: root.proc_ref(),
                    signal,
                }));
                if !self.jobs.iter().any(|j| j.target_pending(root.pid)) {
                    self.actions.push(Action::Release(root.proc_ref()));
                }
                Outcome::Warned
            };
            self.keep_record(KillRecord {
                time: at.clone(),
                host: self.host.clone(),
                pid: root.pid,
                ppid: root.ppid,
                analysis_id: analysis_id.clone(),
                reason: Reason::Warning,
                limit: Some(limit),
                rss_bytes: details.rss_bytes.max(root.rss_bytes()),
                runtime_ms: clock.boot_ns.saturating_sub(root.start_ns) / 1_000_000,
                signals: vec![crate::vocab::record::SignalSent {
                    signal: signal.as_str().into(),
                    at: at.clone(),
                }],
                outcome,
                comm: root.comm.as_str().into_owned(),
                cmdline: details.cmdline,
                uid: details.uid,
                owner_uid: Some(owner),
                warned_of: Some(of),
                zombies: None,
            });
        }
    }

    // ---- orphans -------------------------------------------------------------------

    /// `pid`'s parent died. Adopted by a process of its own analysis (a subreaper the
    /// analysis runs: tini, a job runner, `PR_SET_CHILD_SUBREAPER`), it is no orphan:
    /// the tree follows the kernel and nobody is signalled. Reparented anywhere else
    /// (init, a subreaper outside the analysis) it is an orphan. The exit event can
    /// come before the kernel has reparented the children: then /proc still names the
    /// dead parent, and the question is asked again a moment later (`looks` taken so
    /// far; see [`REPARENT_LOOKS`]).
    fn parent_gone(&mut self, pid: u32, looks: usize, procs: &dyn Procs, clock: &Clock) {
        let Some(node) = self.tree.get(pid) else {
            return;
        };
        let (analysis, start_ns, old_ppid) = (node.analysis, node.start_ns, node.ppid);
        let Some(now) = procs.read(pid).filter(|p| same_start(p.start_ns, start_ns)) else {
            return; // Dead too: no orphan.
        };
        if now.ppid == old_ppid
            && let Some(wait) = REPARENT_LOOKS.get(looks)
        {
            self.reparent_checks
                .insert(pid, (clock.now + *wait, looks + 1));
            return;
        }
        let adopter = self.tree.get(now.ppid).map(|n| n.analysis);
        if now.ppid != old_ppid && adopter == Some(analysis) {
            tracing::debug!(
                pid,
                adopter = now.ppid,
                "adopted inside its analysis: no orphan"
            );
            self.tree.reparent(pid, now.ppid);
            self.processes_dirty = true;
            return;
        }
        self.orphaned_as(pid, now.ppid, procs, clock);
    }

    /// `pid` lives on after its parent died: flag it, then kill or log it (and its
    /// subtree) by its analysis' policy, unless a kill already covers it.
    fn orphaned(&mut self, pid: u32, procs: &dyn Procs, clock: &Clock) {
        let Some(start_ns) = self.tree.get(pid).map(|n| n.start_ns) else {
            return;
        };
        // Its own exit may still be queued behind its parent's (a tree dying under a
        // kill that has already finished): a dead process is no orphan.
        if let Some(now) = procs.read(pid).filter(|p| same_start(p.start_ns, start_ns)) {
            self.orphaned_as(pid, now.ppid, procs, clock);
        }
    }

    /// `pid`, found living with `new_ppid` as its parent, is an orphan.
    fn orphaned_as(&mut self, pid: u32, new_ppid: u32, procs: &dyn Procs, clock: &Clock) {
        let Some(analysis) = self.tree.get(pid).map(|n| n.analysis) else {
            return;
        };
        if !self.tree.mark_orphan(pid) {
            return; // Flagged already.
        }
        self.processes_dirty = true;
        let covered = self.jobs.iter().any(|j| j.has_target(pid));
        let policy = self.registry.get(analysis).map(|a| a.limits.orphans);
        if let (false, Some(policy)) = (covered, policy) {
            tracing::warn!(pid, ?policy, "orphan: its parent died while it lives on");
            // Recorded with the parent that died, before the tree follows the kernel's
            // reparenting.
            let pids = self.tree.subtree(pid);
            match policy {
                OrphanPolicy::Kill => self.start_kill(
                    Scope::Subtree,
                    Reason::Orphan,
                    analysis,
                    None,
                    &pids,
                    procs,
                    clock,
                ),
                OrphanPolicy::Log => self.record_only(analysis, &pids, procs, clock),
            }
        }
        self.tree.reparent(pid, new_ppid);
    }

    /// The process that launched a registered root exited.
    pub fn on_launcher_exit(&mut self, root: ProcRef, procs: &dyn Procs, clock: &Clock) {
        if self.tree.holds(root) {
            self.orphaned(root.pid, procs, clock);
        }
        self.finish_done_jobs(clock);
    }

    // ---- kills ---------------------------------------------------------------------

    fn job_spec(
        &self,
        scope: Scope,
        reason: Reason,
        analysis: AnalysisKey,
        limit: Option<u64>,
        mode: Mode,
    ) -> JobSpec {
        let (analysis_id, grace, owner_uid) = self
            .registry
            .get(analysis)
            .map(|a| (a.id.clone(), a.limits.grace(), Some(a.owner)))
            .unwrap_or_else(|| (String::new(), self.settings.defaults.grace(), None));
        JobSpec {
            scope,
            reason,
            analysis,
            analysis_id,
            owner_uid,
            limit,
            zombies: None,
            grace,
            mode,
        }
    }

    /// Starts a kill of `pids` (SIGTERM now, SIGKILL after the grace).
    #[allow(clippy::too_many_arguments)]
    fn start_kill(
        &mut self,
        scope: Scope,
        reason: Reason,
        analysis: AnalysisKey,
        limit: Option<u64>,
        pids: &[u32],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let spec = self.job_spec(scope, reason, analysis, limit, self.kill_mode());
        self.start_job(spec, pids, procs, clock);
    }

    /// How kills are made: signalled, or (`--dry-run`) only recorded.
    fn kill_mode(&self) -> Mode {
        if self.settings.dry_run {
            Mode::DryRun
        } else {
            Mode::Signal
        }
    }

    fn start_job(&mut self, spec: JobSpec, pids: &[u32], procs: &dyn Procs, clock: &Clock) {
        tracing::warn!(
            analysis_id = spec.analysis_id,
            reason = spec.reason.as_str(),
            processes = pids.len(),
            dry_run = self.settings.dry_run,
            "limit crossed: killing"
        );
        let job = self.new_job(spec, pids, procs, clock);
        self.jobs.push(job);
        self.processes_dirty = true;
    }

    /// A job of `spec` over `pids`, their first signals queued.
    fn new_job(
        &mut self,
        spec: JobSpec,
        pids: &[u32],
        procs: &dyn Procs,
        clock: &Clock,
    ) -> KillJob {
        let mut job = KillJob::new(spec, clock.now, clock.wall);
        for &pid in pids {
            self.add_target(&mut job, pid, procs, clock);
        }
        job
    }

    /// A violation that is recorded, not acted on (orphan policy `log`).
    fn record_only(
        &mut self,
        analysis: AnalysisKey,
        pids: &[u32],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let spec = self.job_spec(
            Scope::Subtree,
            Reason::Orphan,
            analysis,
            None,
            Mode::LogOnly,
        );
        let job = self.new_job(spec, pids, procs, clock);
        self.finish(job);
    }

    fn add_target(&mut self, job: &mut KillJob, pid: u32, procs: &dyn Procs, clock: &Clock) {
        let Some(node) = self.tree.get(pid) else {
            return;
        };
        if self.jobs.iter().any(|j| j.target_pending(pid)) {
            return; // Already being killed: one kill, one record per process.
        }
        if pid <= 1 || pid == self.self_pid {
            // Never, whatever the bookkeeping says (effects refuses these too).
            tracing::error!(pid, "refusing to signal init or the daemon");
            return;
        }
        let details = procs.details(pid);
        let info = TargetInfo {
            process: node.proc_ref(),
            ppid: node.ppid,
            comm: node.comm.as_str().into_owned(),
            cmdline: details.cmdline,
            uid: details.uid,
            rss_bytes: details.rss_bytes.max(node.rss_bytes()),
            runtime_ms: clock.boot_ns.saturating_sub(node.start_ns) / 1_000_000,
        };
        if let Some(order) = job.add(info, clock.now, clock.wall) {
            self.actions.push(Action::Signal(order));
        }
    }

    /// A signal could not be delivered (the process is gone, or its pid was recycled).
    pub fn on_signal_failed(&mut self, order: SignalOrder, clock: &Clock) {
        for job in &mut self.jobs {
            job.signal_failed(order.target, order.signal);
        }
        self.finish_done_jobs(clock);
    }

    /// Deadlines that passed and graces that ended.
    pub fn on_tick(&mut self, procs: &dyn Procs, clock: &Clock) {
        for key in self.registry.due(clock.now) {
            let Some(timeout_ms) = self.registry.get(key).map(|a| a.limits.timeout_ms) else {
                continue;
            };
            self.kill_analysis(key, Reason::Timeout, Some(timeout_ms), procs, clock);
        }
        for key in self.registry.warnings_due(clock.now) {
            let Some(timeout_ms) = self.registry.get(key).map(|a| a.limits.timeout_ms) else {
                continue;
            };
            self.warn(key, Reason::Timeout, timeout_ms, procs, clock);
        }
        for job in &mut self.jobs {
            for order in job.escalate(clock.now, clock.wall) {
                self.actions.push(Action::Signal(order));
            }
        }
        let expired: Vec<AnalysisKey> = self
            .lingering
            .iter()
            .filter(|(_, at)| **at <= clock.now)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            self.forget_if_finished(key, clock);
        }
        let rechecks: Vec<(u32, usize)> = self
            .reparent_checks
            .iter()
            .filter(|(_, (at, _))| *at <= clock.now)
            .map(|(pid, (_, looks))| (*pid, *looks))
            .collect();
        for (pid, looks) in rechecks {
            self.reparent_checks.remove(&pid);
            self.parent_gone(pid, looks, procs, clock);
        }
        if self.zombie_sweep_at.is_some_and(|at| at <= clock.now) {
            self.sweep_zombies(procs, clock);
        }
        self.finish_done_jobs(clock);
    }

    /// Jobs are over once every target has exited *and* the tree has taken in those
    /// exits: until then a target's children look parentless, and the job must still
    /// be there to claim them (else they would be flagged as orphans of this kill).
    fn finish_done_jobs(&mut self, clock: &Clock) {
        if !self.jobs.iter().any(KillJob::is_done) {
            return;
        }
        let (done, running): (Vec<KillJob>, Vec<KillJob>) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(KillJob::is_done);
        self.jobs = running;
        for job in done {
            let analysis = job.analysis;
            self.finish(job);
            self.forget_if_finished(analysis, clock);
        }
    }

    /// Records a finished job: one record per process, kept for `status`.
    fn finish(&mut self, job: KillJob) {
        self.processes_dirty = true;
        for process in job.signalled() {
            self.actions.push(Action::Release(process));
        }
        for record in job.records(&self.host) {
            self.keep_record(record);
        }
    }

    /// Counts a record, keeps it for `status` and hands it to the store.
    fn keep_record(&mut self, record: KillRecord) {
        if !matches!(record.outcome, Outcome::Logged | Outcome::Warned)
            && record.reason != Reason::Warning
        {
            self.counters.kills += 1;
        }
        *self
            .counters
            .kills_by_reason
            .entry(record.reason.as_str())
            .or_default() += 1;
        if self.recent.len() == RECORDS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(record.clone());
        self.actions.push(Action::Record(Box::new(record)));
    }

    // ---- registration --------------------------------------------------------------

    /// Whether `caller` may do everything: root, or a member of `--admin-group`.
    pub fn is_admin(&self, caller: &Peer) -> bool {
        caller.uid == 0
            || self
                .settings
                .admin_gid
                .is_some_and(|gid| caller.in_group(gid))
    }

    /// Checks a registration before anything is touched, so a refused one changes
    /// nothing. A caller other than root and the admin group may watch only processes
    /// that run as itself (real uid), and join only analyses it created.
    pub fn check_register(
        &self,
        pid: u32,
        analysis_id: &str,
        overrides: &LimitOverrides,
        caller: &Peer,
        procs: &dyn Procs,
    ) -> Result<Registration> {
        if analysis_id.trim().is_empty() {
            bail!("the analysis id is empty: pass --analysis-id with a name for the analysis");
        }
        if analysis_id.len() > MAX_ANALYSIS_ID {
            bail!(
                "the analysis id is {} bytes long: use at most {MAX_ANALYSIS_ID}",
                analysis_id.len()
            );
        }
        if pid == 0 || pid == 1 {
            bail!(
                "refusing to watch pid {pid}: it is the system's init/idle task, which the watchdog never touches"
            );
        }
        if pid == self.self_pid {
            bail!("refusing to watch pid {pid}: it is the watchdog daemon itself");
        }
        let Some(root) = procs.read(pid) else {
            bail!("no process with pid {pid}: check the pid (the process may have exited)");
        };
        if root.kernel_thread {
            bail!(
                "pid {pid} ({}) is a kernel thread: only user processes can be watched",
                root.comm
            );
        }
        let confined_to = (!self.is_admin(caller)).then_some(caller.uid);
        if let Some(uid) = confined_to {
            self.check_own_process(&root, uid, None, procs)?;
        }
        if let Some(node) = self.tree.get(pid) {
            let current = self.registry.id(node.analysis).unwrap_or("?");
            if current != analysis_id {
                bail!(
                    "pid {pid} is already watched as part of analysis {current:?}: unregister it first"
                );
            }
        }
        let existing = self.registry.key(analysis_id);
        if let (Some(uid), Some(key)) = (confined_to, existing) {
            let owner = self.registry.get(key).map_or(0, |a| a.owner);
            if owner != uid {
                bail!(
                    "refused by rule own-analyses: analysis {analysis_id:?} was created by uid \
                     {owner}, and you are uid {uid}: only its owner, root or a member of the \
                     admin group may add processes to it; pick another --analysis-id (nothing \
                     was registered)"
                );
            }
        }
        let limits = self
            .settings
            .defaults
            .with(overrides)
            .map_err(|e| anyhow::anyhow!("{e}: nothing was registered"))?;
        self.settings.check_reachable(overrides)?;
        let launcher = Some(root.ppid)
            .filter(|&p| p > 1 && p != self.self_pid)
            .and_then(|p| procs.read(p));
        Ok(Registration {
            key: existing.unwrap_or_else(|| self.registry.next_key()),
            new_analysis: existing.is_none(),
            analysis_id: analysis_id.to_string(),
            limits,
            launcher,
            owner: caller.uid,
            confined_to,
            root,
        })
    }

    /// Refuses a process that does not run as `uid` (its real uid); `root_pid` names
    /// the registered root when `process` is one of its descendants. A process gone
    /// meanwhile is no refusal: nothing of it can be watched.
    fn check_own_process(
        &self,
        process: &ProcInfo,
        uid: u32,
        root_pid: Option<u32>,
        procs: &dyn Procs,
    ) -> Result<()> {
        let Some(runs_as) = procs.real_uid(process.proc_ref()) else {
            if root_pid.is_none() {
                bail!(
                    "no process with pid {}: check the pid (the process may have exited)",
                    process.pid
                );
            }
            return Ok(());
        };
        if runs_as == uid {
            return Ok(());
        }
        let what = match root_pid {
            None => format!("pid {} ({})", process.pid, process.comm),
            Some(root) => format!(
                "pid {} ({}), a descendant of pid {root},",
                process.pid, process.comm
            ),
        };
        bail!(
            "refused by rule own-processes: {what} runs as uid {runs_as}, and you are uid \
             {uid}: only root or a member of the admin group may watch another user's \
             processes; register a process of your own (nothing was registered)"
        )
    }

    /// For a caller confined to its own processes: every existing descendant of the
    /// root that the walk would watch must run as the caller too. Called with the
    /// descendants found before anything is put in the kernel map, and again by the walk
    /// for each one it watches (one that appeared or changed hands meanwhile).
    pub fn check_descendants(
        &self,
        registration: &Registration,
        descendants: &[ProcRef],
        procs: &dyn Procs,
    ) -> Result<()> {
        let Some(uid) = registration.confined_to else {
            return Ok(());
        };
        for process in descendants {
            if process.pid == self.self_pid || self.tree.contains(process.pid) {
                continue; // The walk leaves these alone.
            }
            let info = ProcInfo {
                pid: process.pid,
                ppid: 0,
                start_ns: process.start_ns,
                comm: procs
                    .read(process.pid)
                    .map(|p| p.comm)
                    .unwrap_or_else(|| "?".into()),
                kernel_thread: false,
                exited: false,
            };
            self.check_own_process(&info, uid, Some(registration.root.pid), procs)?;
        }
        Ok(())
    }

    /// Which analysis, if any, holds `pid` now (the registration walk stops there).
    pub fn analysis_of(&self, pid: u32) -> Option<AnalysisKey> {
        self.tree.get(pid).map(|n| n.analysis)
    }

    /// Takes in a registration whose processes `effects` put in the kernel map
    /// (`watched`: those verified to be the same living processes afterwards). Joining
    /// an analysis that is being killed joins its kill: nothing registered into a dying
    /// analysis escapes it.
    pub fn adopt(
        &mut self,
        registration: Registration,
        watched: &[ProcInfo],
        procs: &dyn Procs,
        clock: &Clock,
    ) -> Result<Registered> {
        let Registration {
            root,
            analysis_id,
            key,
            new_analysis,
            limits,
            launcher,
            owner,
            confined_to: _,
        } = registration;
        let root_watched =
            watched.iter().any(|p| p.pid == root.pid) || self.tree.contains(root.pid);
        if !root_watched {
            bail!("pid {} exited while it was being registered", root.pid);
        }
        if new_analysis {
            let made = self
                .registry
                .create(&analysis_id, &limits, owner, clock.now, clock.wall);
            debug_assert_eq!(made, key);
            let entry = registry::entry_from_analysis(self.registry.get(key).expect("just made"));
            self.actions
                .push(Action::SaveAnalysis(key, Box::new(entry)));
        }
        for info in watched {
            self.insert(node_of(info, key));
            self.join_dying_scope(info.pid, info.ppid, key, procs, clock);
        }
        let root_ref = ProcRef {
            pid: root.pid,
            start_ns: root.start_ns,
        };
        let launcher = launcher.map(|l| ProcRef {
            pid: l.pid,
            start_ns: l.start_ns,
        });
        let entry = Root {
            process: root_ref,
            analysis: key,
            launcher,
        };
        self.registry.add_root(entry);
        self.actions.push(Action::SaveRoot(
            root.pid,
            registry::entry_from_root(&entry),
        ));
        if let Some(launcher) = launcher {
            self.actions.push(Action::WatchLauncher {
                root: root_ref,
                launcher,
            });
        }
        let watched = self.tree.member_count(key);
        tracing::info!(pid = root.pid, analysis_id, watched, "registered");
        Ok(Registered {
            pid: root.pid,
            analysis_id,
            watched,
        })
    }

    /// Stops watching a process with its subtree, or a whole analysis. A caller other
    /// than root and the admin group may unregister only analyses it created, and a
    /// process only when it runs as the caller and all of its subtree is in analyses
    /// the caller created.
    pub fn unregister(
        &mut self,
        pid: Option<u32>,
        analysis_id: Option<&str>,
        caller: &Peer,
        procs: &dyn Procs,
        clock: &Clock,
    ) -> Result<usize> {
        let confined_to = (!self.is_admin(caller)).then_some(caller.uid);
        let pids = match (pid, analysis_id) {
            (Some(pid), None) => {
                let Some(node) = self.tree.get(pid) else {
                    bail!("pid {pid} is not watched: see `watchdog-user dump-tree`");
                };
                let subtree = self.tree.subtree(pid);
                if let Some(uid) = confined_to {
                    let runs_as = procs.real_uid(node.proc_ref());
                    if let Some(runs_as) = runs_as.filter(|&r| r != uid) {
                        bail!(
                            "refused by rule own-processes: pid {pid} ({}) runs as uid \
                             {runs_as}, and you are uid {uid}: only root or a member of the \
                             admin group may unregister another user's processes (nothing was \
                             unregistered)",
                            node.comm.as_str()
                        );
                    }
                    for &member in &subtree {
                        let Some(key) = self.tree.get(member).map(|n| n.analysis) else {
                            continue;
                        };
                        self.check_own_analysis(key, uid, "unregister processes of")?;
                    }
                }
                subtree
            }
            (None, Some(id)) => {
                let Some(key) = self.registry.key(id) else {
                    bail!("no analysis {id:?} is watched: see `watchdog-user dump-tree`");
                };
                if let Some(uid) = confined_to {
                    self.check_own_analysis(key, uid, "unregister")?;
                }
                self.tree.members(key)
            }
            _ => bail!("unregister takes exactly one of --pid or --analysis-id"),
        };
        let mut analyses = HashSet::new();
        for &pid in &pids {
            if let Some(node) = self.remove(pid) {
                self.actions.push(Action::Unwatch(node.proc_ref()));
                analyses.insert(node.analysis);
            }
        }
        for key in analyses {
            self.forget_if_finished(key, clock);
        }
        tracing::info!(
            ?pid,
            ?analysis_id,
            uid = caller.uid,
            removed = pids.len(),
            "unregistered"
        );
        Ok(pids.len())
    }

    /// Refuses `doing` to an analysis `uid` did not create.
    fn check_own_analysis(&self, key: AnalysisKey, uid: u32, doing: &str) -> Result<()> {
        let Some(analysis) = self.registry.get(key) else {
            return Ok(());
        };
        if analysis.owner != uid {
            bail!(
                "refused by rule own-analyses: analysis {:?} was created by uid {}, and you \
                 are uid {uid}: only its owner, root or a member of the admin group may \
                 {doing} it (nothing was unregistered)",
                analysis.id,
                analysis.owner
            );
        }
        Ok(())
    }

    // ---- resync and restart --------------------------------------------------------

    /// Rebuilds the tree from the kernel's map (which the programs keep exact even when
    /// events are lost) and /proc (for parentage and names).
    pub fn resync(
        &mut self,
        in_map: &[(ProcRef, AnalysisKey)],
        procs: &dyn Procs,
        clock: &Clock,
        reason: Resync,
    ) {
        self.resynced_at_ns = clock.boot_ns;
        self.counters.resyncs += u64::from(reason == Resync::LostEvents);
        let mapped: HashSet<u32> = in_map.iter().map(|(p, _)| p.pid).collect();
        let mut touched = HashSet::new();
        for pid in self.tree.pids() {
            // A process the rules follow without the kernel (the map could not take
            // it) is not in the map by definition.
            if !mapped.contains(&pid)
                && !self.untracked.contains_key(&pid)
                && let Some(node) = self.remove(pid)
            {
                touched.insert(node.analysis);
            }
        }
        for &(process, key) in in_map {
            if self.registry.get(key).is_none() {
                self.actions.push(Action::Unwatch(process));
                continue;
            }
            if self.tree.holds(process) {
                continue;
            }
            // The entry's start time is the process' identity: /proc must show that very
            // process, never whatever holds its pid now.
            match procs.read(process.pid) {
                Some(info) if same_start(info.start_ns, process.start_ns) => {
                    self.insert(Node::new(
                        process.pid,
                        info.ppid,
                        process.start_ns,
                        Comm::new(&info.comm),
                        key,
                    ));
                    self.join_dying_scope(process.pid, info.ppid, key, procs, clock);
                }
                _ => self.actions.push(Action::Unwatch(process)),
            }
        }
        for key in touched {
            self.forget_if_finished(key, clock);
        }
        self.finish_done_jobs(clock);
        tracing::info!(?reason, watched = self.tree.len(), "tree resynced");
    }

    /// After a restart: the kernel map says what is watched, the saved analyses and
    /// roots say why. A process whose parent is no longer in the tree lost it while we
    /// were down (descendants are only watched through a watched parent), and a root
    /// whose launcher is gone was orphaned: both are flagged now, by their policy.
    pub fn resume(
        &mut self,
        analyses: &[(AnalysisKey, AnalysisEntry)],
        roots: &[(u32, RootEntry)],
        in_map: &[(ProcRef, AnalysisKey)],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        for (key, entry) in analyses {
            self.registry.restore(
                *key,
                registry::analysis_from_entry(entry, clock.now, clock.wall),
            );
        }
        self.resync(in_map, procs, clock, Resync::Restart);
        let saved: std::collections::HashMap<u32, RootEntry> = roots.iter().copied().collect();
        let parentless: Vec<ProcRef> = self.tree.roots().iter().map(|n| n.proc_ref()).collect();
        for process in parentless {
            let root = saved
                .get(&process.pid)
                .filter(|r| same_start(r.start_ns, process.start_ns));
            let Some(root) = root else {
                self.orphaned(process.pid, procs, clock);
                continue;
            };
            let launcher = (root.parent_pid != 0).then_some(ProcRef {
                pid: root.parent_pid,
                start_ns: root.parent_start_ns,
            });
            self.registry.add_root(Root {
                process,
                analysis: root.analysis,
                launcher,
            });
            let Some(launcher) = launcher else { continue };
            let launcher_alive = procs
                .read(launcher.pid)
                .is_some_and(|p| same_start(p.start_ns, launcher.start_ns));
            if launcher_alive {
                self.actions.push(Action::WatchLauncher {
                    root: process,
                    launcher,
                });
            } else {
                self.orphaned(process.pid, procs, clock);
            }
        }
        self.finish_done_jobs(clock);
        tracing::info!(
            analyses = self.registry.len(),
            watched = self.tree.len(),
            "resumed the previous run's analyses"
        );
    }

    // ---- the process table -----------------------------------------------------------

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

/// The tree's node for a process /proc (or the kernel's walk) described.
fn node_of(info: &ProcInfo, key: AnalysisKey) -> Node {
    Node::new(
        info.pid,
        info.ppid,
        info.start_ns,
        Comm::new(&info.comm),
        key,
    )
}

#[cfg(test)]
pub mod tests;
