//! The tree rebuilt from the kernel's map, which the programs keep exact even when
//! events are lost: at start, after lost events, and after a restart (with the saved
//! analyses and roots, which say why each process is watched).

use std::collections::{HashMap, HashSet};

use watchdog_common::RootEntry;

use crate::{
    core::{
        Core,
        procs::Procs,
        registry::{self, Launch, Root},
        tree::Node,
        world::{Action, Clock, Resync, Saved},
    },
    vocab::process::{AnalysisKey, Comm, ProcRef, same_start},
};

impl Core {
    /// Rebuilds the tree from the kernel's map (which the programs keep exact even when
    /// events are lost) and /proc (for parentage and names).
    pub fn resync(
        &mut self,
        in_map: &[(ProcRef, AnalysisKey)],
        procs: &dyn Procs,
        clock: &Clock,
        reason: Resync,
    ) {
        self.world.resynced_at_ns = clock.boot_ns;
        self.world.counters.resyncs += u64::from(reason == Resync::LostEvents);
        let mapped: HashSet<u32> = in_map.iter().map(|(p, _)| p.pid).collect();
        let mut touched = HashSet::new();
        for pid in self.world.tree.pids() {
            // A process the rules follow without the kernel (the map could not take
            // it) is not in the map by definition.
            if !mapped.contains(&pid)
                && !self.forks.untracked.contains_key(&pid)
                && let Some(node) = self.world.remove(pid)
            {
                touched.insert(node.analysis);
            }
        }
        for &(process, key) in in_map {
            if self.world.registry.get(key).is_none() {
                self.world.actions.push(Action::Unwatch(process));
                continue;
            }
            if self.world.tree.holds(process) {
                continue;
            }
            // The entry's start time is the process' identity: /proc must show that very
            // process, never whatever holds its pid now.
            match procs.read(process.pid) {
                Some(info) if same_start(info.start_ns, process.start_ns) => {
                    self.world.insert(Node::new(
                        process.pid,
                        info.ppid,
                        process.start_ns,
                        Comm::new(&info.comm),
                        key,
                    ));
                    self.world
                        .join_dying_scope(process.pid, info.ppid, key, clock);
                }
                _ => self.world.actions.push(Action::Unwatch(process)),
            }
        }
        for key in touched {
            self.world.forget_if_finished(key, clock);
        }
        self.world.finish_done_jobs(procs, clock);
        tracing::info!(?reason, watched = self.world.tree.len(), "tree resynced");
    }

    /// After a restart: the kernel map says what is watched, the saved analyses and
    /// roots say why. A process whose parent is no longer in the tree lost it while we
    /// were down (descendants are only watched through a watched parent), and a root
    /// whose launcher is gone was orphaned: both are flagged now, by their policy.
    /// Kills in progress go on where they were: a target sent SIGTERM before is not
    /// sent it again, and is SIGKILLed when that grace ends.
    pub fn resume(
        &mut self,
        saved: &Saved,
        in_map: &[(ProcRef, AnalysisKey)],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let (roots, launchers) = (&saved.roots, &saved.launchers);
        self.world.resume_sigterms(&saved.kills, procs);
        for (key, entry) in &saved.analyses {
            self.world.registry.restore(
                *key,
                registry::analysis_from_entry(entry, clock.now, clock.wall),
            );
        }
        self.resume_launches(launchers, procs);
        self.resync(in_map, procs, clock, Resync::Restart);
        self.take_up_strikes(&saved.kills, procs, clock);
        let saved_roots: HashMap<u32, RootEntry> = roots.iter().copied().collect();
        let parentless: Vec<ProcRef> = self
            .world
            .tree
            .roots()
            .iter()
            .map(|n| n.proc_ref())
            .collect();
        for process in parentless {
            let root = saved_roots
                .get(&process.pid)
                .filter(|r| same_start(r.start_ns, process.start_ns));
            let Some(root) = root else {
                match self.launcher_parent(process, &saved_roots, procs) {
                    Some(launcher) => self.world.actions.push(Action::WatchLauncher {
                        root: process,
                        launcher,
                    }),
                    None => self
                        .orphans
                        .orphaned(&mut self.world, process.pid, procs, clock),
                }
                continue;
            };
            let launcher = (root.parent_pid != 0).then_some(ProcRef {
                pid: root.parent_pid,
                start_ns: root.parent_start_ns,
            });
            self.world.registry.add_root(Root {
                process,
                analysis: root.analysis,
                launcher,
            });
            let Some(launcher) = launcher else { continue };
            let launcher_alive = procs
                .read(launcher.pid)
                .is_some_and(|p| same_start(p.start_ns, launcher.start_ns));
            if launcher_alive {
                self.world.actions.push(Action::WatchLauncher {
                    root: process,
                    launcher,
                });
            } else {
                self.orphans
                    .orphaned(&mut self.world, process.pid, procs, clock);
            }
        }
        self.world.finish_done_jobs(procs, clock);
        tracing::info!(
            launches = launchers.len(),
            analyses = self.world.registry.len(),
            watched = self.world.tree.len(),
            "resumed the previous run's analyses"
        );
    }

    /// The living parent of `process`, a member that is no root, when that parent is
    /// the launcher of a root (or a launch) of its analysis: `process` is a child a
    /// root made with `CLONE_PARENT`, never orphaned. Any other parent outside the tree
    /// adopted it after its own parent died while no daemon ran.
    fn launcher_parent(
        &self,
        process: ProcRef,
        saved: &HashMap<u32, RootEntry>,
        procs: &dyn Procs,
    ) -> Option<ProcRef> {
        let key = self.world.tree.get(process.pid)?.analysis;
        let info = procs
            .read(process.pid)
            .filter(|p| same_start(p.start_ns, process.start_ns))?;
        let parent = procs
            .read(info.ppid)
            .filter(|p| p.pid > 1 && p.start_ns <= process.start_ns)?
            .proc_ref();
        let is_parent = |launcher: ProcRef| {
            launcher.pid == parent.pid && same_start(launcher.start_ns, parent.start_ns)
        };
        let launched_a_root = saved.values().any(|r| {
            r.analysis == key
                && is_parent(ProcRef {
                    pid: r.parent_pid,
                    start_ns: r.parent_start_ns,
                })
        });
        let launches = self
            .world
            .registry
            .launchers_of(key)
            .into_iter()
            .any(is_parent);
        (launched_a_root || launches).then_some(parent)
    }

    /// The launches the kernel kept while no daemon ran: each of a living launcher and
    /// a known analysis goes on (its exit watched again); the others end.
    fn resume_launches(&mut self, launchers: &[(ProcRef, AnalysisKey)], procs: &dyn Procs) {
        for &(launcher, key) in launchers {
            let alive = procs
                .read(launcher.pid)
                .is_some_and(|p| same_start(p.start_ns, launcher.start_ns));
            if alive && self.world.registry.get(key).is_some() {
                self.world.registry.add_launch(Launch {
                    process: launcher,
                    analysis: key,
                });
                self.world.actions.push(Action::WatchLauncher {
                    root: launcher,
                    launcher,
                });
            } else {
                self.world.actions.push(Action::Unlaunch(launcher));
            }
        }
    }
}
