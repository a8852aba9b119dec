//! The rules applied: deadlines, memory limits and orphans turn into kill jobs
//! (`kill`), which run inside the daemon loop and end as records.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    daemon::Watchdog,
    kill::{KillJob, KillRecord, Outcome, PidFd, Scope, TargetInfo},
    policy::{OrphanPolicy, Reason},
    procs::{self, ProcInfo},
    store::StoreMsg,
    tree::AnalysisKey,
};

/// An analysis as saved in the kernel map, back in the daemon's terms; its deadline
/// keeps its wall-clock time (one that passed while we were down is due at once).
fn analysis_from_entry(
    entry: &watchdog_common::AnalysisEntry,
    now_wall: std::time::SystemTime,
) -> crate::tree::Analysis {
    let unix = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let deadline_wall = unix(entry.deadline_unix_ms);
    let left = deadline_wall.duration_since(now_wall).unwrap_or_default();
    crate::tree::Analysis {
        id: String::from_utf8_lossy(&entry.id[..entry.id_len as usize]).into_owned(),
        limits: crate::policy::Limits {
            timeout_ms: entry.timeout_ms,
            memory_bytes: entry.memory_bytes,
            tree_memory_bytes: (entry.tree_memory_bytes != 0).then_some(entry.tree_memory_bytes),
            grace_ms: entry.grace_ms,
            orphans: if entry.orphans == 1 {
                OrphanPolicy::Log
            } else {
                OrphanPolicy::Kill
            },
        },
        deadline: Instant::now() + left,
        deadline_wall,
        registered_wall: unix(entry.registered_unix_ms),
        violated: false,
    }
}

/// The kernel map's form of an analysis.
pub(crate) fn entry_from_analysis(
    analysis: &crate::tree::Analysis,
) -> watchdog_common::AnalysisEntry {
    let unix_ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, crate::policy::millis)
    };
    let mut id = [0u8; watchdog_common::ANALYSIS_ID_MAX];
    let bytes = analysis.id.as_bytes();
    id[..bytes.len()].copy_from_slice(bytes);
    watchdog_common::AnalysisEntry {
        id,
        id_len: bytes.len() as u32,
        orphans: u32::from(analysis.limits.orphans == OrphanPolicy::Log),
        timeout_ms: analysis.limits.timeout_ms,
        memory_bytes: analysis.limits.memory_bytes,
        tree_memory_bytes: analysis.limits.tree_memory_bytes.unwrap_or(0),
        grace_ms: analysis.limits.grace_ms,
        registered_unix_ms: unix_ms(analysis.registered_wall),
        deadline_unix_ms: unix_ms(analysis.deadline_wall),
    }
}

/// How often a running kill looks for exits, new members and the end of its grace.
const KILL_TICK: Duration = Duration::from_millis(10);
/// Records kept in memory for `events` (the database keeps them all).
const RECORDS_KEPT: usize = 10_000;

/// A registered root, by identity.
#[derive(Clone, Copy, Debug)]
pub struct RootRef {
    pub pid: u32,
    pub start_ns: u64,
}

impl Watchdog {
    /// The process that started a registered root is not watched, so its exit sends no
    /// event: watch it through a pidfd, which polls readable the moment it exits.
    pub(crate) fn watch_root_parent(&self, root: &ProcInfo) {
        let parent = root.ppid;
        if parent <= 1 || parent == self.self_pid {
            return; // Already orphaned or started by us: nothing to lose.
        }
        let Some(parent_info) = procs::read(parent) else {
            return;
        };
        let Some(pidfd) = PidFd::open_verified(parent, parent_info.start_ns) else {
            return;
        };
        let tx = self.parent_exit_tx.clone();
        let root = RootRef {
            pid: root.pid,
            start_ns: root.start_ns,
        };
        // SAFETY: PidFd owns its fd and keeps it open, unchanged, for its whole life.
        match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
            Ok(fd) => {
                tokio::spawn(async move {
                    if fd.readable().await.is_ok() {
                        let _ = tx.send(root);
                    }
                });
            }
            Err(err) => tracing::warn!(
                parent,
                "cannot watch the parent of root {}: {err}",
                root.pid
            ),
        }
    }

    /// After a restart: the kernel map says what is watched, the saved analyses and
    /// roots say why. A process whose parent is no longer in the tree lost it while we
    /// were down (descendants are only watched through a watched parent), and a root
    /// whose launcher is gone was orphaned: both are flagged now, by their policy.
    pub(crate) fn resume(&mut self) {
        let now_wall = std::time::SystemTime::now();
        for (key, entry) in self.kernel.saved_analyses() {
            self.analyses
                .restore(key, analysis_from_entry(&entry, now_wall));
        }
        self.resync("restart");
        let roots: std::collections::HashMap<u32, watchdog_common::RootEntry> =
            self.kernel.roots().into_iter().collect();
        let parentless: Vec<u32> = self.tree.roots().iter().map(|n| n.pid).collect();
        for pid in parentless {
            let Some(node) = self.tree.get(pid) else {
                continue;
            };
            match roots
                .get(&pid)
                .filter(|r| procs::same_start(r.start_ns, node.start_ns))
            {
                Some(root) => {
                    let launcher_alive = procs::read(root.parent_pid)
                        .is_some_and(|p| procs::same_start(p.start_ns, root.parent_start_ns));
                    if launcher_alive {
                        if let Some(info) = procs::read(pid) {
                            self.watch_root_parent(&info);
                        }
                    } else {
                        self.orphaned(pid);
                    }
                }
                None => self.orphaned(pid),
            }
        }
        tracing::info!(
            analyses = self.analyses.len(),
            watched = self.tree.len(),
            "resumed the previous run's analyses"
        );
    }

    pub(crate) fn root_parent_died(&mut self, root: RootRef) {
        let same = self
            .tree
            .get(root.pid)
            .is_some_and(|n| procs::same_start(n.start_ns, root.start_ns));
        if same {
            self.orphaned(root.pid);
        }
    }

    /// `pid` lives on after its parent died: flag it, then kill or log it (and its
    /// subtree) by its analysis' policy, unless a kill already covers it.
    pub(crate) fn orphaned(&mut self, pid: u32) {
        let Some(node) = self.tree.get_mut(pid) else {
            return;
        };
        if node.orphan {
            return;
        }
        // Its own exit may still be queued behind its parent's (a tree dying under a
        // kill that has already finished): a dead process is no orphan.
        let start_ns = node.start_ns;
        if !procs::read(pid).is_some_and(|now| procs::same_start(now.start_ns, start_ns)) {
            return;
        }
        let Some(node) = self.tree.get_mut(pid) else {
            return;
        };
        node.orphan = true;
        let analysis = node.analysis;
        let covered = self.jobs.iter().any(|j| j.has_target(pid));
        let policy = self.analyses.get(analysis).map(|a| a.limits.orphans);
        if let (false, Some(policy)) = (covered, policy) {
            tracing::warn!(pid, ?policy, "orphan: its parent died while it lives on");
            // Recorded with the parent that died, before the tree follows the kernel's
            // reparenting.
            let pids = self.tree.subtree(pid);
            match policy {
                OrphanPolicy::Kill => {
                    self.start_kill(Scope::Subtree, Reason::Orphan, analysis, None, &pids)
                }
                OrphanPolicy::Log => {
                    self.record_only(Scope::Subtree, Reason::Orphan, analysis, &pids)
                }
            }
        }
        if let Some(now) = procs::read(pid) {
            self.tree.reparent(pid, now.ppid);
        }
    }

    /// A violation that is recorded, not acted on (orphan policy `log`).
    fn record_only(&mut self, scope: Scope, reason: Reason, analysis: AnalysisKey, pids: &[u32]) {
        let mut job = self.new_job(scope, reason, analysis, None);
        job.dry_run = true;
        for &pid in pids {
            if let Some(info) = self.target_info(pid) {
                job.add(info);
            }
        }
        self.finish(job, Some(Outcome::Logged));
    }

    fn new_job(
        &self,
        scope: Scope,
        reason: Reason,
        analysis: AnalysisKey,
        limit: Option<u64>,
    ) -> KillJob {
        let (id, grace) = self
            .analyses
            .get(analysis)
            .map(|a| (a.id.clone(), a.limits.grace()))
            .unwrap_or_else(|| (String::new(), self.defaults.grace()));
        KillJob::new(scope, reason, analysis, &id, limit, grace, self.dry_run)
    }

    fn target_info(&self, pid: u32) -> Option<TargetInfo> {
        if let Some(node) = self.tree.get(pid) {
            return Some(TargetInfo {
                pid,
                ppid: node.ppid,
                start_ns: node.start_ns,
                comm: node.comm.clone(),
            });
        }
        let info = procs::read(pid)?;
        Some(TargetInfo {
            pid,
            ppid: info.ppid,
            start_ns: info.start_ns,
            comm: info.comm,
        })
    }

    /// Starts a kill of `pids` (SIGTERM now, SIGKILL after the grace).
    pub(crate) fn start_kill(
        &mut self,
        scope: Scope,
        reason: Reason,
        analysis: AnalysisKey,
        limit: Option<u64>,
        pids: &[u32],
    ) {
        if self.jobs.is_empty() {
            self.kill_tick_at = Instant::now() + KILL_TICK;
        }
        self.processes_dirty = true;
        let mut job = self.new_job(scope, reason, analysis, limit);
        tracing::warn!(
            analysis_id = job.analysis_id,
            reason = reason.as_str(),
            processes = pids.len(),
            dry_run = self.dry_run,
            "limit crossed: killing"
        );
        for &pid in pids {
            if let Some(info) = self.target_info(pid) {
                job.add(info);
            }
        }
        if scope == Scope::Analysis {
            self.sweep_analysis(&mut job);
        }
        self.jobs.push(job);
    }

    /// Adds members the kernel map holds that the job has not seen yet: forked while
    /// the analysis dies, their fork events possibly still queued.
    fn sweep_analysis(&self, job: &mut KillJob) {
        for (pid, key) in self.kernel.watched() {
            if key == job.analysis && !job.has_target(pid) {
                if let Some(info) = self.target_info(pid) {
                    job.add(info);
                }
            }
        }
    }

    /// A fork inside a dying scope joins the kill at once.
    pub(crate) fn join_dying_scope(&mut self, pid: u32, ppid: u32, analysis: AnalysisKey) {
        if self.jobs.is_empty() {
            return;
        }
        let Some(info) = self.target_info(pid) else {
            return;
        };
        if let Some(job) = self.jobs.iter_mut().find(|j| j.takes_child(ppid, analysis)) {
            job.add(info);
        }
    }

    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        let deadline = self
            .analyses
            .iter()
            .filter(|(_, a)| !a.violated)
            .map(|(_, a)| a.deadline)
            .min();
        let kill_tick = (!self.jobs.is_empty()).then_some(self.kill_tick_at);
        deadline.into_iter().chain(kill_tick).min()
    }

    pub(crate) fn on_timers(&mut self) {
        // A fixed instant, not "now + tick" at each look: requests arriving faster than
        // the tick would otherwise push it away forever.
        self.kill_tick_at = Instant::now() + KILL_TICK;
        self.enforce_deadlines();
        self.advance_jobs();
    }

    fn enforce_deadlines(&mut self) {
        let now = Instant::now();
        let due: Vec<(AnalysisKey, u64)> = self
            .analyses
            .iter()
            .filter(|(_, a)| !a.violated && a.deadline <= now)
            .map(|(key, a)| (key, a.limits.timeout_ms))
            .collect();
        for (key, timeout_ms) in due {
            self.analyses.get_mut(key).expect("listed").violated = true;
            let pids = self.tree.pids_of(key);
            self.start_kill(
                Scope::Analysis,
                Reason::Timeout,
                key,
                Some(timeout_ms),
                &pids,
            );
        }
    }

    fn advance_jobs(&mut self) {
        for mut job in std::mem::take(&mut self.jobs) {
            if job.scope == Scope::Analysis {
                self.sweep_analysis(&mut job);
            }
            // Done once every target has exited *and* the tree has taken in those exits:
            // until then a target's children look parentless, and the job must still be
            // there to claim them (else they would be flagged as orphans of this kill).
            if job.advance() && !self.tree_still_holds(&job) {
                self.finish(job, None);
            } else {
                self.jobs.push(job);
            }
        }
    }

    fn tree_still_holds(&self, job: &KillJob) -> bool {
        job.signalled().into_iter().any(|(pid, start_ns)| {
            self.tree
                .get(pid)
                .is_some_and(|n| procs::same_start(n.start_ns, start_ns))
        })
    }

    /// Records a finished job: logged as one JSON line per process, kept for `events`.
    fn finish(&mut self, job: KillJob, outcome: Option<Outcome>) {
        self.processes_dirty = true;
        for mut record in job.records(&self.host) {
            if let Some(outcome) = outcome {
                record.outcome = outcome;
            }
            self.counters.kills += u64::from(record.outcome != Outcome::Logged);
            tracing::warn!(target: "kill_event", "{}", serde_json::to_string(&record).expect("records serialize"));
            let _ = self.store.send(StoreMsg::Record(Box::new(record.clone())));
            self.keep(record);
        }
    }

    fn keep(&mut self, record: KillRecord) {
        if self.records.len() == RECORDS_KEPT {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }

    /// The reconcile poll: RSS of every watched process against its analysis' limits.
    /// The safety net for the kernel's fast path.
    pub(crate) fn reconcile(&mut self) {
        let started = Instant::now();
        self.reconcile_now();
        self.counters.last_poll_us =
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    }

    fn reconcile_now(&mut self) {
        let mut analyses = HashSet::new();
        for pid in self.tree.pids() {
            let rss = procs::rss_bytes(pid);
            if let Some(node) = self.tree.get_mut(pid) {
                node.rss_bytes = rss;
                analyses.insert(node.analysis);
            }
            self.check_process_memory(pid);
        }
        for key in analyses {
            self.check_tree_memory(key);
        }
    }

    /// The kernel's fast path: a watched process' RSS crossed its limit or moved.
    pub(crate) fn rss_reported(&mut self, pid: u32, analysis: AnalysisKey, rss_bytes: u64) {
        let Some(node) = self.tree.get_mut(pid) else {
            return;
        };
        node.rss_bytes = rss_bytes;
        self.check_process_memory(pid);
        self.check_tree_memory(analysis);
    }

    fn check_process_memory(&mut self, pid: u32) {
        let Some(node) = self.tree.get(pid) else {
            return;
        };
        let Some(limit) = self
            .analyses
            .get(node.analysis)
            .map(|a| a.limits.memory_bytes)
        else {
            return;
        };
        if node.rss_bytes > limit {
            self.memory_exceeded(pid, node.analysis, limit);
        }
    }

    fn check_tree_memory(&mut self, key: AnalysisKey) {
        let Some(a) = self.analyses.get(key) else {
            return;
        };
        let Some(limit) = a.limits.tree_memory_bytes else {
            return;
        };
        if a.violated {
            return;
        }
        let pids = self.tree.pids_of(key);
        let sum: u64 = pids
            .iter()
            .filter_map(|p| self.tree.get(*p))
            .map(|n| n.rss_bytes)
            .sum();
        if sum > limit {
            tracing::warn!(
                analysis_id = a.id.clone(),
                sum,
                limit,
                "tree memory limit crossed"
            );
            self.analyses.get_mut(key).expect("exists").violated = true;
            self.start_kill(Scope::Analysis, Reason::TreeMemory, key, Some(limit), &pids);
        }
    }

    /// One process over the per-process limit: it alone is killed.
    pub(crate) fn memory_exceeded(&mut self, pid: u32, analysis: AnalysisKey, limit: u64) {
        let Some(node) = self.tree.get_mut(pid) else {
            return;
        };
        if node.memory_violated || self.jobs.iter().any(|j| j.has_target(pid)) {
            return;
        }
        node.memory_violated = true;
        self.start_kill(
            Scope::Process,
            Reason::Memory,
            analysis,
            Some(limit),
            &[pid],
        );
    }
}
