//! Memory: a process over its per-process limit is killed alone; an analysis whose
//! tree memory (PSS summed, measured once the RSS sum crosses) passes its tree limit is
//! killed whole; near either limit, the warning. RSS comes for free from the kernel's
//! counters; PSS is a walk of each address space, so it is measured only when the RSS
//! says it may matter.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use watchdog_common::KillProgress;

use crate::{
    core::{
        kill::Scope,
        procs::{Held, Procs},
        tree::Tree,
        world::{Action, Clock, World},
    },
    vocab::{
        limits::Reason,
        process::{AnalysisKey, ProcRef},
    },
};
/// With an analysis over its tree limit by RSS but not by PSS, the PSS is measured
/// again once the RSS sum grows by this part of the limit (and at every poll).
const PSS_REMEASURE_PART: u64 = 32;
/// And no sooner than this after the last measure: a measure walks every address space
/// of the analysis (~150 µs a process), and 300 processes growing at once would
/// otherwise have it measured at each of their reports, the loop doing nothing else.
const PSS_REMEASURE_AFTER: Duration = Duration::from_millis(200);

/// A PSS measure that found the sum under a level.
#[derive(Clone, Copy)]
struct Measure {
    rss_sum: u64,
    at: Instant,
}

/// What a crossing by RSS came to.
enum Pss {
    /// The PSS sum reached the level too: this.
    Reached(u64),
    Under,
    /// Measured too recently: measure again at this time.
    Later(Instant),
}

/// Analyses whose RSS sum had crossed one level of their tree limit (the limit, or its
/// warning level) while their PSS sum had not: that measure.
#[derive(Default)]
struct PssUnder(HashMap<AnalysisKey, Measure>);
impl PssUnder {
    /// Asked once the RSS sum (`sum`, an upper bound: it counts a page shared by N
    /// processes N times) has crossed a level: the PSS sum, which counts it once, when
    /// it has `reached` the level too. PSS is a walk of each address space, so after a
    /// measure found it under, it is measured again only once the RSS sum has grown by
    /// `limit / PSS_REMEASURE_PART` (or the poll forgot the measure), and not before
    /// `PSS_REMEASURE_AFTER`.
    fn reaches(
        &mut self,
        key: AnalysisKey,
        (sum, limit): (u64, u64),
        reached: impl Fn(u64) -> bool,
        (tree, outside): (&Tree, u64),
        procs: &dyn Procs,
        now: Instant,
    ) -> Pss {
        if let Some(last) = self.0.get(&key).copied() {
            if sum < last.rss_sum.saturating_add(limit / PSS_REMEASURE_PART) {
                return Pss::Under;
            }
            if now < last.at + PSS_REMEASURE_AFTER {
                return Pss::Later(last.at + PSS_REMEASURE_AFTER);
            }
        }
        let pss: u64 = tree
            .members(key)
            .into_iter()
            .map(|pid| procs.pss_bytes(pid).unwrap_or(0))
            .sum();
        if reached(pss + outside) {
            self.0.remove(&key);
            return Pss::Reached(pss);
        }
        tracing::debug!(key, rss_sum = sum, pss, limit, "under by PSS: shared pages");
        self.0.insert(
            key,
            Measure {
                rss_sum: sum,
                at: now,
            },
        );
        Pss::Under
    }

    fn forget(&mut self, key: AnalysisKey) {
        self.0.remove(&key);
    }
}

/// The memory rule's state: analyses over a level of their tree limit by RSS but not by
/// PSS (shared pages), for the limit and for its warning level; and the kernel's RSS
/// sum of each analysis with a tree limit, as last reported.
#[derive(Default)]
pub struct Memory {
    over_rss: PssUnder,
    over_rss_warning: PssUnder,
    kernel_sums: HashMap<AnalysisKey, u64>,
    /// Analyses whose tree is to be checked again once a measure may be made.
    remeasures: HashMap<AnalysisKey, Instant>,
}

impl Memory {
    /// Drops what is kept of an analysis that is over.
    pub fn forget(&mut self, key: AnalysisKey) {
        self.forget_measures(key);
        self.kernel_sums.remove(&key);
        self.remeasures.remove(&key);
    }

    pub fn next_wakeup(&self) -> Option<Instant> {
        self.remeasures.values().min().copied()
    }

    /// The trees whose measure was put off, checked now that it may be made.
    pub(in crate::core) fn remeasures_due(
        &mut self,
        w: &mut World,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let due: Vec<AnalysisKey> = self
            .remeasures
            .iter()
            .filter(|&(_, &at)| at <= clock.now)
            .map(|(&key, _)| key)
            .collect();
        for key in due {
            self.remeasures.remove(&key);
            let own = w.tree.rss_sum(key);
            self.check_tree_memory(w, key, own, procs, clock);
        }
    }

    /// What a crossing by RSS came to, a measure put off being kept for later.
    fn pss_reached(&mut self, pss: Pss, key: AnalysisKey) -> Option<u64> {
        match pss {
            Pss::Reached(pss) => Some(pss),
            Pss::Under => None,
            Pss::Later(at) => {
                let due = self.remeasures.entry(key).or_insert(at);
                *due = (*due).min(at);
                None
            }
        }
    }

    fn forget_measures(&mut self, key: AnalysisKey) {
        self.over_rss.forget(key);
        self.over_rss_warning.forget(key);
    }

    /// The kernel's sum of the analysis' RSS: it follows every change, where the
    /// processes' own reports each wait for a step (300 processes each 7 MiB larger
    /// would be 2 GiB that no report shows).
    pub(in crate::core) fn tree_rss_seen(
        &mut self,
        w: &mut World,
        key: AnalysisKey,
        rss_sum: u64,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        if w.registry.get(key).is_none() {
            return;
        }
        self.kernel_sums.insert(key, rss_sum);
        let own = w.tree.rss_sum(key);
        self.check_tree_memory(w, key, own, procs, clock);
    }

    /// What the analysis' RSS sum is at least: the daemon's own sum of its processes'
    /// last reports, or the kernel's running sum, whichever is more. The kernel's counts
    /// a process from its first change after the sum started, so an idle process is in
    /// the daemon's sum only; a process growing in steps below the report's is in the
    /// kernel's only.
    fn rss_bound(&self, key: AnalysisKey, own: u64) -> u64 {
        own.max(self.kernel_sums.get(&key).copied().unwrap_or(0))
    }

    pub(in crate::core) fn rss_seen(
        &mut self,
        w: &mut World,
        pid: u32,
        rss_bytes: u64,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some((analysis, sum)) = w.tree.set_rss(pid, rss_bytes) else {
            return;
        };
        self.check_process_memory(w, pid, procs, clock);
        self.check_tree_memory(w, analysis, sum, procs, clock);
    }

    /// The kernel sent `process` SIGTERM the moment it crossed its limit
    /// ([`watchdog_common::STRIKE_MEMORY`]; `kept`: what its pinned entry holds): its
    /// kill goes on from that SIGTERM, as one this daemon had sent, and its record says
    /// the kernel sent it. The kernel
    /// strikes by RSS alone, which only `--memory-metric rss` compares, and never
    /// during a dry run: no PSS is read here.
    pub(in crate::core) fn struck(
        &mut self,
        w: &mut World,
        process: ProcRef,
        kept: &KillProgress,
        clock: &Clock,
    ) {
        let limit = w
            .tree
            .get(process.pid)
            .filter(|_| w.tree.holds(process))
            .and_then(|n| Some((n.analysis, w.registry.get(n.analysis)?.limits.memory_bytes)));
        let Some((analysis, limit)) = limit else {
            // Out of the tree before its event was read: its record was made when the
            // tree let it go (`record_past_strike`), or it was unregistered.
            tracing::debug!(
                pid = process.pid,
                "a strike of a process no longer in the tree"
            );
            w.actions.push(Action::ForgetKillProgress(process));
            return;
        };
        w.tree.set_rss(process.pid, kept.struck_rss);
        if w.jobs.iter().any(|j| j.has_target(process.pid)) {
            return; // A kill's own SIGTERM went out too, and its entry replaced this one.
        }
        w.counters.kernel_strikes += 1;
        w.take_up_strike(process, analysis, kept, clock);
        let outside = w.shm.process_bytes(process);
        let _ = w.tree.mark_memory_violated(process.pid);
        w.start_kill(
            Scope::Process,
            Reason::Memory,
            analysis,
            Some(limit),
            &[process.pid],
            clock,
        );
        if let Some(job) = w.jobs.last_mut().filter(|j| j.reason == Reason::Memory) {
            job.shmem_bytes = Some(outside).filter(|&b| b > 0);
        }
    }

    pub(in crate::core) fn check_process_memory(
        &mut self,
        w: &mut World,
        pid: u32,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(node) = w.tree.get(pid) else {
            return;
        };
        let analysis = node.analysis;
        let Some(limits) = w.registry.get(analysis).map(|a| &a.limits) else {
            return;
        };
        let (limit, warn_level) = (limits.memory_bytes, limits.warn_level(limits.memory_bytes));
        let outside = w.shm.process_bytes(node.proc_ref());
        let memory = node.rss_bytes() + outside;
        if let Some(level) = warn_level.filter(|&level| memory >= level) {
            self.warn_of_process_memory(w, pid, level, limit, procs, clock);
        }
        if w.tree.get(pid).is_none() || memory <= limit || w.jobs.iter().any(|j| j.has_target(pid))
        {
            return;
        }
        // RSS is an upper bound of PSS: only a crossing by RSS needs the PSS read.
        if w.settings.memory_metric == crate::vocab::limits::MemoryMetric::Pss
            && procs
                .pss_bytes(pid)
                .is_none_or(|pss| pss + outside <= limit)
        {
            return;
        }
        if !w.tree.mark_memory_violated(pid) {
            return;
        }
        w.start_kill(
            Scope::Process,
            Reason::Memory,
            analysis,
            Some(limit),
            &[pid],
            clock,
        );
        if let Some(job) = w.jobs.last_mut().filter(|j| j.reason == Reason::Memory) {
            job.shmem_bytes = Some(outside).filter(|&b| b > 0);
        }
    }

    pub(in crate::core) fn check_tree_memory(
        &mut self,
        w: &mut World,
        key: AnalysisKey,
        sum: u64,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(limit) = w.registry.get(key).and_then(|a| a.limits.tree_memory_bytes) else {
            return;
        };
        let outside = w.shm.analysis_bytes(key);
        let sum = self.rss_bound(key, sum);
        self.warn_of_tree_memory(w, key, sum, limit, procs, clock);
        // The RSS sum counts a page shared by N processes N times (a pool forked from
        // a parent holding its data): it is an upper bound, and only once it crosses
        // is the PSS sum, which counts every page once, measured and compared.
        if sum + outside <= limit || w.registry.violation(key).is_some() {
            return;
        }
        let measured = self.over_rss.reaches(
            key,
            (sum + outside, limit),
            |memory| memory > limit,
            (&w.tree, outside),
            procs,
            clock.now,
        );
        let Some(pss) = self.pss_reached(measured, key) else {
            return;
        };
        let analysis_id = w.registry.id(key).unwrap_or_default().to_string();
        tracing::warn!(
            analysis_id,
            pss,
            rss_sum = sum,
            outside_rss = outside,
            limit,
            "tree memory limit crossed"
        );
        w.kill_analysis(key, Reason::TreeMemory, Some(limit), clock);
        let job = w
            .jobs
            .iter_mut()
            .rev()
            .find(|j| j.analysis == key && j.reason == Reason::TreeMemory);
        if let Some(job) = job {
            job.tree_sums = Some((pss, sum));
            job.shmem_bytes = Some(outside).filter(|&b| b > 0);
        }
    }

    /// A process' memory reached the warning's level of its limit (by RSS, or by PSS
    /// under `--memory-metric pss`, as the limit itself is compared).
    pub(in crate::core) fn warn_of_process_memory(
        &mut self,
        w: &mut World,
        pid: u32,
        level: u64,
        limit: u64,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(key) = w.tree.get(pid).map(|n| n.analysis) else {
            return;
        };
        let warned = w
            .registry
            .get(key)
            .is_none_or(|a| a.warned.contains(&Reason::Memory) || a.violation.is_some());
        let outside = w
            .tree
            .get(pid)
            .map_or(0, |n| w.shm.process_bytes(n.proc_ref()));
        if warned
            || (w.settings.memory_metric == crate::vocab::limits::MemoryMetric::Pss
                && procs.pss_bytes(pid).is_none_or(|pss| pss + outside < level))
        {
            return;
        }
        w.warn(key, Reason::Memory, limit, procs, clock);
    }

    /// The analysis' memory reached the warning's level of its tree limit: by the RSS
    /// sum first, then (as for the limit itself) by the PSS sum, which counts a shared
    /// page once.
    pub(in crate::core) fn warn_of_tree_memory(
        &mut self,
        w: &mut World,
        key: AnalysisKey,
        sum: u64,
        limit: u64,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let Some(analysis) = w.registry.get(key) else {
            return;
        };
        let Some(level) = analysis.limits.warn_level(limit) else {
            return;
        };
        let outside = w.shm.analysis_bytes(key);
        if sum + outside < level
            || analysis.warned.contains(&Reason::TreeMemory)
            || analysis.violation.is_some()
        {
            return;
        }
        let measured = self.over_rss_warning.reaches(
            key,
            (sum + outside, limit),
            |memory| memory >= level,
            (&w.tree, outside),
            procs,
            clock.now,
        );
        if self.pss_reached(measured, key).is_some() {
            w.warn(key, Reason::TreeMemory, limit, procs, clock);
        }
    }

    /// The reconcile poll's RSS of each process and the tmpfs files of those holding
    /// any: each process checked against its limit, then each analysis' sum against
    /// its tree limit.
    pub fn on_poll(
        &mut self,
        w: &mut World,
        samples: &[(ProcRef, u64)],
        held: &[(ProcRef, Held)],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        let tree = &w.tree;
        w.shm.polled(
            held,
            |process| Some(tree.get(process.pid)?.analysis).filter(|_| tree.holds(process)),
            procs,
        );
        let mut analyses = HashSet::new();
        for &(process, rss) in samples {
            if !w.tree.holds(process) {
                continue;
            }
            if let Some((analysis, _)) = w.tree.set_rss(process.pid, rss) {
                self.check_process_memory(w, process.pid, procs, clock);
                analyses.insert(analysis);
            }
        }
        for key in analyses {
            // Writes to shared pages (copy-on-write) raise the PSS, not the RSS: the
            // poll measures again whatever is over its limit by RSS.
            self.forget_measures(key);
            let sum = w.tree.rss_sum(key);
            self.check_tree_memory(w, key, sum, procs, clock);
        }
    }
}
