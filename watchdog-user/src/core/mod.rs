//! The rules core, sans I/O: a state machine fed kernel events, requests, poll results
//! and the clock, which answers with [`Action`]s (watch this, signal that, record
//! this) for the effects to carry out. It reads /proc only through [`Procs`] and the
//! time only from the [`Clock`] it is given, so every rule is unit-tested with a fake
//! /proc and a fake clock, without a kernel.
//!
//! [`Core`] only dispatches: each input goes to the rule families (`rules/`: timeouts,
//! memory, orphans, zombies, forks, warnings, access, and the kills every rule ends
//! in), each owning its state and timers beside the shared [`World`].
//!
//! The rules: a timeout or a tree-memory crossing kills the whole analysis; a process
//! over its memory limit is killed alone; a process whose parent dies while it lives
//! on is an orphan, killed with its subtree or only recorded, by its analysis' policy.
//! A kill is SIGTERM, the grace, then SIGKILL; processes forked into a dying scope
//! join it at once, and a dying analysis kills whatever later appears in it.

pub mod event;
pub mod kill;
pub mod procs;
pub mod registration;
pub mod registry;
mod resync;
pub mod rules;
pub mod runs;
pub mod shmem;
pub mod snapshot;
pub mod tree;
pub mod world;

use std::{collections::VecDeque, time::Instant};

use anyhow::Result;
use watchdog_common::KillProgress;

pub use crate::core::{
    registration::{Registered, Registration, Watch},
    rules::{access::admin_only, forks::Retrack},
    world::{Action, Clock, Counters, DYING_LINGER, MAX_ANALYSIS_ID, Resync, Saved, Settings},
};
use crate::{
    core::{
        event::KernelEvent,
        kill::{KillJob, SignalOrder},
        procs::{Details, Held, ProcInfo, Procs},
        registry::{Analysis, Registry},
        rules::{
            forks::Forks,
            memory::Memory,
            orphans::{Orphans, REPARENT_WINDOW},
            zombies::{ZombieWatch, Zombies},
        },
        snapshot::ProcessSnapshot,
        tree::{Node, Tree},
        world::World,
    },
    vocab::{
        limits::{LimitOverrides, RssLevels},
        peer::Peer,
        process::{AnalysisKey, ProcRef},
        record::KillRecord,
    },
};

pub struct Core {
    world: World,
    memory: Memory,
    orphans: Orphans,
    zombies: ZombieWatch,
    forks: Forks,
}

impl Core {
    pub fn new(settings: Settings, host: String, self_pid: u32) -> Self {
        Self {
            world: World::new(settings, host, self_pid),
            memory: Memory::default(),
            orphans: Orphans::default(),
            zombies: ZombieWatch::default(),
            forks: Forks::default(),
        }
    }

    pub fn zombies(&self) -> &Zombies {
        &self.zombies.known
    }

    pub fn tree(&self) -> &Tree {
        &self.world.tree
    }

    pub fn registry(&self) -> &Registry {
        &self.world.registry
    }

    pub fn jobs(&self) -> &[KillJob] {
        &self.world.jobs
    }

    pub fn settings(&self) -> &Settings {
        &self.world.settings
    }

    pub fn set_settings(&mut self, settings: Settings) {
        self.world.settings = settings;
    }

    /// The analyses people see: not the killed ones lingering empty before they are
    /// forgotten.
    pub fn live_analyses(&self) -> impl Iterator<Item = (AnalysisKey, &Analysis)> {
        let lingering = &self.world.lingering;
        self.world
            .registry
            .iter()
            .filter(|(key, _)| !lingering.contains_key(key))
    }

    /// How run `key` of an analysis stands.
    pub fn run_state(&self, key: AnalysisKey) -> runs::RunState {
        let live = self.world.registry.get(key).is_some();
        self.world.runs.state(key, live)
    }

    pub fn counters(&self) -> &Counters {
        &self.world.counters
    }

    pub fn recent(&self) -> &VecDeque<KillRecord> {
        &self.world.recent
    }

    pub fn resynced_at_ns(&self) -> u64 {
        self.world.resynced_at_ns
    }

    /// What the rules want done since the last call, in order. The families drop what
    /// they kept of the analyses forgotten meanwhile.
    pub fn take_actions(&mut self) -> Vec<Action> {
        for key in std::mem::take(&mut self.world.forgotten) {
            self.memory.forget(key);
            self.world.shm.forget(key);
        }
        std::mem::take(&mut self.world.actions)
    }

    /// When the rules next need the clock: the soonest of every family's timers.
    pub fn next_wakeup(&self) -> Option<Instant> {
        [
            self.world.timeouts_wakeup(),
            self.world.kills_wakeup(),
            self.orphans.next_wakeup(),
            self.zombies.next_wakeup(),
            self.memory.next_wakeup(),
            self.world.record_rates.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn on_event(&mut self, event: KernelEvent, procs: &dyn Procs, clock: &Clock) {
        let w = &mut self.world;
        match event {
            KernelEvent::Fork {
                pid,
                ppid,
                analysis,
                start_ns,
                comm,
                untracked,
                launched,
                ..
            } => {
                let node = Node::new(pid, ppid, start_ns, comm, analysis);
                self.forks.forked(w, node, untracked, launched, clock);
                if !launched {
                    let child = ProcRef { pid, start_ns };
                    self.orphans
                        .watch_outside_parent(w, child, ppid, procs, clock);
                }
            }
            KernelEvent::Exit {
                pid,
                analysis,
                start_ns,
                ..
            } => {
                w.counters.exits += 1;
                self.exited(ProcRef { pid, start_ns }, procs, clock);
                self.world.forget_if_finished(analysis, clock);
            }
            KernelEvent::Rss { pid, rss_bytes, .. } => {
                w.counters.rss_reports += 1;
                self.memory.rss_seen(w, pid, rss_bytes, procs, clock);
            }
            KernelEvent::TreeRss { analysis, rss_sum } => {
                w.counters.rss_reports += 1;
                self.memory
                    .tree_rss_seen(w, analysis, rss_sum, procs, clock);
            }
            KernelEvent::Struck {
                process,
                analysis,
                rss_bytes,
                ts_ns,
            } => {
                // Its pinned entry, when the daemon could read it, comes through
                // `take_up_strikes`, with what the kernel read of the process.
                w.counters.rss_reports += 1;
                let kept = KillProgress {
                    start_ns: process.start_ns,
                    analysis,
                    struck_boot_ns: ts_ns,
                    struck_rss: rss_bytes,
                    ..KillProgress::default()
                };
                self.memory.struck(w, process, &kept, clock);
            }
            KernelEvent::Refused {
                pid,
                analysis,
                refused,
            } => tracing::info!(
                pid,
                analysis_id = w.registry.id(analysis).unwrap_or_default(),
                refused,
                "the kernel refuses forks past the process limit: recorded once the burst is over"
            ),
            KernelEvent::Exec { pid, comm } => {
                w.counters.execs += 1;
                w.tree.set_comm(pid, comm);
            }
        }
        self.world.finish_done_jobs(procs, clock);
    }

    /// Bursts of forks the kernel refused, over and not recorded yet: one record each.
    pub fn forks_refused(
        &mut self,
        bursts: &[rules::forks::RefusalBurst],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        for burst in bursts {
            self.world.record_refusals(burst, procs, clock);
        }
    }

    /// SIGTERMs the kernel sent at memory crossings that no event told of (lost to a
    /// full ring, or sent while no daemon ran; their pinned entries say so): each
    /// kill goes on from its SIGTERM, and a process gone since is recorded as it
    /// ended. Called once the tree is rebuilt from the kernel map.
    pub fn take_up_strikes(
        &mut self,
        kills: &[(u32, KillProgress)],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let untaken = kills
            .iter()
            .filter(|(_, p)| p.struck_boot_ns != 0 && p.escalate_boot_ns == 0);
        for &(pid, struck) in untaken {
            let process = ProcRef {
                pid,
                start_ns: struck.start_ns,
            };
            if self.world.tree.holds(process) {
                self.memory.struck(&mut self.world, process, &struck, clock);
            } else {
                self.world
                    .record_past_strike(process, &struck, procs, clock);
            }
        }
        self.world.finish_done_jobs(procs, clock);
    }

    /// A member exited: its children lost their parent, and its parent may hold it
    /// unreaped.
    fn exited(&mut self, process: ProcRef, procs: &dyn Procs, clock: &Clock) {
        let w = &mut self.world;
        if !w.tree.holds(process) {
            return; // A recycled pid's older exit, or one the tree already let go.
        }
        let children: Vec<u32> = w.tree.children_of(process.pid).collect();
        if let Some(node) = w.remove(process.pid) {
            if w.registry.drop_root(node.analysis, process.pid) {
                w.actions.push(Action::ForgetRoot(process.pid));
            }
            if !w.tree.contains(node.ppid) {
                // A root or a member with a parent outside: its parent's watch was its.
                w.actions.push(Action::ForgetParentWatch(process));
            }
            self.zombies.maybe_zombie(w, &node, clock);
        }
        for child in children {
            self.orphans.parent_gone(w, child, 0, procs, clock);
        }
        if self.zombies.known.held_by(process.pid) > 0 {
            // The kernel hands its zombies to init or a subreaper: looked at again once
            // it has.
            self.zombies.sweep_zombies_at(clock.now + REPARENT_WINDOW);
        }
    }

    /// The reconcile poll's findings: (process, RSS) of watched processes, and the
    /// tmpfs files of those holding any. Samples of a pid that now names another
    /// process are ignored.
    pub fn on_poll(
        &mut self,
        samples: &[(ProcRef, u64)],
        held: &[(ProcRef, Held)],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let w = &mut self.world;
        self.memory.on_poll(w, samples, held, procs, clock);
        self.zombies.sweep_zombies(w, procs, clock);
        w.finish_done_jobs(procs, clock);
    }

    /// Deadlines that passed, graces that ended, and every family's timers.
    pub fn on_tick(&mut self, procs: &dyn Procs, clock: &Clock) {
        let w = &mut self.world;
        w.timeouts_due(procs, clock);
        w.graces_due(clock);
        w.lingering_due(clock);
        self.orphans.looks_due(w, procs, clock);
        self.zombies.sweep_due(w, procs, clock);
        self.memory.remeasures_due(w, procs, clock);
        w.record_rates.expire(clock.now);
        w.finish_done_jobs(procs, clock);
    }

    /// A signal could not be delivered (the process is gone, or its pid was recycled).
    pub fn on_signal_failed(&mut self, order: SignalOrder, procs: &dyn Procs, clock: &Clock) {
        self.world.on_signal_failed(order, procs, clock);
    }

    /// What the effects read of kill targets (command line, owner, RSS) before their
    /// first signal, and the first signals they could not send.
    pub fn on_described(
        &mut self,
        described: &[(ProcRef, Details)],
        not_sent: &[SignalOrder],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        self.world.on_described(described, not_sent, procs, clock);
    }

    /// A watched parent outside the analysis exited: a launch of its own ends, and
    /// `root` (a root it started, or a member whose parent it was) is an orphan.
    pub fn on_launcher_exit(&mut self, root: ProcRef, procs: &dyn Procs, clock: &Clock) {
        if self.world.end_launch(root, clock) {
            return;
        }
        self.orphans
            .on_launcher_exit(&mut self.world, root, procs, clock);
    }

    /// Checks a launch (`pid`'s new children join analysis `analysis_id`; `pid` never
    /// does) before anything is touched.
    pub fn check_launch(
        &self,
        pid: u32,
        analysis_id: &str,
        overrides: &LimitOverrides,
        caller: &Peer,
        procs: &dyn Procs,
    ) -> Result<Registration> {
        self.world
            .check_launch(pid, analysis_id, overrides, caller, procs)
    }

    pub fn launch(&mut self, registration: Registration, clock: &Clock) -> Registered {
        self.world.launch(registration, clock)
    }

    /// Untracked processes to hand back to the kernel map: (process, analysis, its
    /// RSS levels).
    pub fn untracked(&self) -> Vec<(ProcRef, AnalysisKey, RssLevels)> {
        self.forks.untracked(&self.world)
    }

    /// What the effects made of handing `process` back to the kernel map.
    pub fn retracked(
        &mut self,
        process: ProcRef,
        outcome: Retrack,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(key) = self.world.tree.get(process.pid).map(|n| n.analysis) else {
            self.forks.untracked.remove(&process.pid);
            return;
        };
        match outcome {
            Retrack::NoRoom => return,
            Retrack::Watched(found) => {
                self.forks
                    .readmitted(&mut self.world, process, key, found, clock)
            }
            Retrack::Gone => {
                // No exit event comes for a process the kernel did not follow.
                self.forks.untracked.remove(&process.pid);
                self.exited(process, procs, clock);
                self.world.forget_if_finished(key, clock);
            }
        }
        self.world.finish_done_jobs(procs, clock);
    }

    /// Whether `caller` may do everything: root, or a member of `--admin-group`.
    pub fn is_admin(&self, caller: &Peer) -> bool {
        self.world.is_admin(caller)
    }

    /// Checks a registration before anything is touched (see `rules::access`).
    pub fn check_register(
        &self,
        pid: u32,
        analysis_id: &str,
        overrides: &LimitOverrides,
        caller: &Peer,
        procs: &dyn Procs,
    ) -> Result<Registration> {
        self.world
            .check_register(pid, analysis_id, overrides, caller, procs)
    }

    /// Checks the descendants a confined caller's registration would watch.
    pub fn check_descendants(
        &self,
        registration: &Registration,
        descendants: &[ProcRef],
        procs: &dyn Procs,
    ) -> Result<()> {
        self.world
            .check_descendants(registration, descendants, procs)
    }

    /// Which analysis, if any, holds `pid` now (the registration walk stops there).
    pub fn analysis_of(&self, pid: u32) -> Option<AnalysisKey> {
        self.world.analysis_of(pid)
    }

    /// Takes in a registration whose processes the effects put in the kernel map.
    pub fn adopt(
        &mut self,
        registration: Registration,
        watched: &[ProcInfo],
        clock: &Clock,
    ) -> Result<Registered> {
        self.world.adopt(registration, watched, clock)
    }

    /// Stops watching a process with its subtree, or a whole analysis; how many
    /// processes it removed.
    pub fn unregister(
        &mut self,
        pid: Option<u32>,
        analysis_id: Option<&str>,
        caller: &Peer,
        procs: &dyn Procs,
        clock: &Clock,
    ) -> Result<usize> {
        self.world
            .unregister(pid, analysis_id, caller, procs, clock)
    }

    /// What is watched now, for `watchdog_processes`, when it changed since last asked.
    pub fn process_snapshot(&mut self, clock: &Clock) -> Option<ProcessSnapshot> {
        self.world.process_snapshot(clock)
    }
}

#[cfg(test)]
pub mod tests;
