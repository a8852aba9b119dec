//! Forks: a fork bomb is stopped from its fork events (more members than
//! `--max-processes` kills the analysis), and a child the kernel map could not take is
//! followed by the rules until the map has room again; the analysis holding the most of
//! a full map is killed so that no other loses its tracking.

use std::collections::BTreeMap;

use crate::{
    core::{
        procs::ProcInfo,
        registration::node_of,
        tree::Node,
        world::{Action, Clock, World},
    },
    vocab::{
        limits::Reason,
        process::{AnalysisKey, ProcRef},
    },
};
/// One burst of forks the kernel refused to analysis `analysis` (none for a second
/// since), not recorded yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalBurst {
    pub analysis: AnalysisKey,
    /// Forks refused in it.
    pub refused: u64,
    /// The process whose fork was refused first, and when (CLOCK_BOOTTIME, ns).
    pub pid: u32,
    pub first_ns: u64,
    /// All the analysis' refusals so far, this burst's included.
    pub total: u64,
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

/// The fork rule's state: processes the kernel map could not take (full, or out of
/// memory), by pid: in the tree, but the kernel reports neither their forks nor their
/// exit, so they are handed back to the map as soon as it has room.
#[derive(Default)]
pub struct Forks {
    pub untracked: BTreeMap<u32, ProcRef>,
}

impl Forks {
    pub(in crate::core) fn forked(
        &mut self,
        w: &mut World,
        node: Node,
        untracked: bool,
        launched: bool,
        clock: &Clock,
    ) {
        w.counters.forks += 1;
        if w.registry.get(node.analysis).is_none() {
            // Forked while its analysis was being unregistered.
            if !untracked {
                w.actions.push(Action::Unwatch(node.proc_ref()));
            }
            return;
        }
        let (process, ppid, analysis) = (node.proc_ref(), node.ppid, node.analysis);
        w.insert(node);
        if launched {
            w.adopt_launched(process, ppid, analysis);
        }
        w.join_dying_scope(process.pid, ppid, analysis, clock);
        self.check_process_count(w, analysis, clock);
        if untracked {
            w.counters.untracked_forks += 1;
            self.untracked.insert(process.pid, process);
            self.make_room(w, clock);
        }
    }

    /// A fork bomb is stopped from its fork events: more members than the analysis'
    /// `max_processes` and the whole analysis is killed.
    pub(in crate::core) fn check_process_count(
        &mut self,
        w: &mut World,
        key: AnalysisKey,
        clock: &Clock,
    ) {
        let Some(max) = w.registry.get(key).map(|a| a.limits.max_processes) else {
            return;
        };
        if w.settings.kernel_refuses_forks {
            return;
        }
        if max != 0 && w.tree.member_count(key) as u64 > max {
            w.kill_analysis(key, Reason::MaxProcesses, Some(max), clock);
        }
    }

    /// The kernel map could not take a process: the analysis holding the most of it is
    /// killed (unless it is being killed already, which frees room by itself), so one
    /// analysis filling the map never costs another its tracking. Like the OOM killer,
    /// the largest goes.
    pub(in crate::core) fn make_room(&mut self, w: &mut World, clock: &Clock) {
        let largest = w
            .registry
            .iter()
            .map(|(key, analysis)| (w.tree.member_count(key), key, analysis.violation))
            .max_by_key(|(members, ..)| *members);
        let Some((members, key, None)) = largest else {
            return;
        };
        tracing::error!(
            analysis_id = w.registry.id(key).unwrap_or_default(),
            members,
            "the kernel's watched map is full: killing the analysis that holds the most of it"
        );
        w.kill_analysis(key, Reason::MapFull, None, clock);
    }

    /// Untracked processes to hand back to the kernel map: (process, analysis, its
    /// RSS levels).
    pub fn untracked(
        &self,
        w: &World,
    ) -> Vec<(ProcRef, AnalysisKey, crate::vocab::limits::RssLevels)> {
        self.untracked
            .values()
            .filter_map(|process| {
                let key = w.tree.get(process.pid)?.analysis;
                let limit = w.registry.get(key)?.limits.rss_levels();
                Some((*process, key, limit))
            })
            .collect()
    }

    /// An untracked process is in the kernel map again, with the descendants it
    /// forked meanwhile (`found`): they join its analysis (and its kill, if it dies).
    pub fn readmitted(
        &mut self,
        w: &mut World,
        process: ProcRef,
        key: AnalysisKey,
        found: Vec<ProcInfo>,
        clock: &Clock,
    ) {
        self.untracked.remove(&process.pid);
        tracing::info!(
            pid = process.pid,
            descendants = found.len(),
            "an untracked process is in the kernel map again"
        );
        for info in found {
            if w.tree.contains(info.pid) {
                continue;
            }
            w.insert(node_of(&info, key));
            w.join_dying_scope(info.pid, info.ppid, key, clock);
        }
        self.check_process_count(w, key, clock);
    }
}
