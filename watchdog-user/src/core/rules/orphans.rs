//! Orphans: a process whose parent dies while it lives on, reparented outside its
//! analysis, is killed with its subtree or only recorded, by its analysis' policy; one
//! adopted by a process of its own analysis (a subreaper it runs) is no orphan. A
//! registered root is orphaned when the process that launched it exits.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::{
    core::{
        kill::Scope,
        procs::Procs,
        world::{Action, Clock, World},
    },
    vocab::{
        limits::{OrphanPolicy, Reason},
        process::{ProcRef, same_start},
    },
};
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
pub const REPARENT_WINDOW: Duration = Duration::from_millis(31);

/// The orphan rule's state: children of a dead parent that /proc did not yet show
/// reparented, when to look again, and how many looks were taken. Until then nobody
/// can tell adopted from orphaned.
#[derive(Default)]
pub struct Orphans {
    reparent_looks: BTreeMap<u32, (Instant, usize)>,
}

impl Orphans {
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.reparent_looks.values().map(|(at, _)| *at).min()
    }

    /// `pid`'s parent died. Adopted by a process of its own analysis (a subreaper the
    /// analysis runs: tini, a job runner, `PR_SET_CHILD_SUBREAPER`), it is no orphan:
    /// the tree follows the kernel and nobody is signalled. Reparented anywhere else
    /// (init, a subreaper outside the analysis) it is an orphan. The exit event can
    /// come before the kernel has reparented the children: then /proc still names the
    /// dead parent, and the question is asked again a moment later (`looks` taken so
    /// far; see [`REPARENT_LOOKS`]).
    pub(in crate::core) fn parent_gone(
        &mut self,
        w: &mut World,
        pid: u32,
        looks: usize,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(node) = w.tree.get(pid) else {
            return;
        };
        let (analysis, start_ns, old_ppid) = (node.analysis, node.start_ns, node.ppid);
        let Some(now) = procs.read(pid).filter(|p| same_start(p.start_ns, start_ns)) else {
            return; // Dead too: no orphan.
        };
        if now.ppid == old_ppid
            && let Some(wait) = REPARENT_LOOKS.get(looks)
        {
            self.reparent_looks
                .insert(pid, (clock.now + *wait, looks + 1));
            return;
        }
        let adopter = w.tree.get(now.ppid).map(|n| n.analysis);
        if now.ppid != old_ppid && adopter == Some(analysis) {
            tracing::debug!(
                pid,
                adopter = now.ppid,
                "adopted inside its analysis: no orphan"
            );
            w.tree.reparent(pid, now.ppid);
            w.processes_dirty = true;
            return;
        }
        self.orphaned_as(w, pid, now.ppid, clock);
    }

    /// `pid` lives on after its parent died: flag it, then kill or log it (and its
    /// subtree) by its analysis' policy, unless a kill already covers it.
    pub(in crate::core) fn orphaned(
        &mut self,
        w: &mut World,
        pid: u32,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(start_ns) = w.tree.get(pid).map(|n| n.start_ns) else {
            return;
        };
        // Its own exit may still be queued behind its parent's (a tree dying under a
        // kill that has already finished): a dead process is no orphan.
        if let Some(now) = procs.read(pid).filter(|p| same_start(p.start_ns, start_ns)) {
            self.orphaned_as(w, pid, now.ppid, clock);
        }
    }

    /// `pid`, found living with `new_ppid` as its parent, is an orphan.
    pub(in crate::core) fn orphaned_as(
        &mut self,
        w: &mut World,
        pid: u32,
        new_ppid: u32,
        clock: &Clock,
    ) {
        let Some(analysis) = w.tree.get(pid).map(|n| n.analysis) else {
            return;
        };
        if !w.tree.mark_orphan(pid) {
            return; // Flagged already.
        }
        w.processes_dirty = true;
        let covered = w.jobs.iter().any(|j| j.has_target(pid));
        let policy = w.registry.get(analysis).map(|a| a.limits.orphans);
        if let (false, Some(policy)) = (covered, policy) {
            tracing::warn!(pid, ?policy, "orphan: its parent died while it lives on");
            // Recorded with the parent that died, before the tree follows the kernel's
            // reparenting.
            let pids = w.tree.subtree(pid);
            match policy {
                OrphanPolicy::Kill => {
                    w.start_kill(Scope::Subtree, Reason::Orphan, analysis, None, &pids, clock)
                }
                OrphanPolicy::Log => w.record_only(analysis, &pids, clock),
            }
        }
        w.tree.reparent(pid, new_ppid);
    }

    /// `child` joined its analysis with a parent outside it: a child a root made with
    /// `CLONE_PARENT` has the root's own parent. That parent's exit sends no event (it is
    /// not watched), so it is watched as a root's launcher is, and its exit orphans the
    /// child the same way; one already gone is judged now.
    pub(in crate::core) fn watch_outside_parent(
        &mut self,
        w: &mut World,
        child: ProcRef,
        ppid: u32,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        // Init never exits, and a parent outside our pid namespace reads as 0.
        if ppid <= 1 || w.tree.contains(ppid) || !w.tree.holds(child) {
            return;
        }
        // A parent younger than its child is another process holding the pid now.
        match procs.read(ppid).filter(|p| p.start_ns <= child.start_ns) {
            Some(parent) => w.actions.push(Action::WatchLauncher {
                root: child,
                launcher: parent.proc_ref(),
            }),
            None => self.parent_gone(w, child.pid, 0, procs, clock),
        }
    }

    /// The watched parent of `root` (the launcher of a registered root, or the parent
    /// outside the analysis of a member) exited.
    pub fn on_launcher_exit(
        &mut self,
        w: &mut World,
        root: ProcRef,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        if w.tree.holds(root) {
            self.orphaned(w, root.pid, procs, clock);
        }
        w.finish_done_jobs(procs, clock);
    }

    /// The children whose next look is due are looked at again.
    pub fn looks_due(&mut self, w: &mut World, procs: &dyn Procs, clock: &Clock) {
        let due: Vec<(u32, usize)> = self
            .reparent_looks
            .iter()
            .filter(|(_, (at, _))| *at <= clock.now)
            .map(|(pid, (_, looks))| (*pid, *looks))
            .collect();
        for (pid, looks) in due {
            self.reparent_looks.remove(&pid);
            self.parent_gone(w, pid, looks, procs, clock);
        }
    }
}
