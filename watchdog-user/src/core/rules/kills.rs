//! Kills, the machinery every rule ends in: a kill job per violation (SIGTERM, the
//! grace, SIGKILL), new members of a dying scope joining it, the records of a finished
//! job, and an analysis forgotten once nothing of it is left.

use crate::{
    core::{
        kill::{EarlierSigterm, FirstAsk, JobSpec, KillJob, Mode, Scope, SignalOrder, TargetInfo},
        procs::{Details, Procs},
        tree::Node,
        world::{Action, Clock, DYING_LINGER, RECORDS_KEPT, RECORDS_KEPT_BYTES, World},
    },
    vocab::{
        limits::Reason,
        process::{AnalysisKey, ProcRef, same_start},
        record::{KillRecord, Outcome, ShmLeft, SignalSent},
        units::rfc3339,
    },
};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use watchdog_common::KillProgress;

/// The monotonic instant of CLOCK_BOOTTIME `boot_ns` (now, if it has passed).
fn instant_at(boot_ns: u64, clock: &Clock) -> Instant {
    clock.now + Duration::from_nanos(boot_ns.saturating_sub(clock.boot_ns))
}

/// The command line the kernel read when it sent SIGTERM, as records keep one.
fn struck_cmdline(struck: &KillProgress) -> String {
    let len = (struck.cmdline_len as usize).min(struck.cmdline.len());
    crate::vocab::record::bounded_cmdline(&struck.cmdline[..len])
}

/// The wall-clock time of CLOCK_BOOTTIME `boot_ns` (now, if that is ahead).
fn wall_at(boot_ns: u64, clock: &Clock) -> SystemTime {
    let ago = Duration::from_nanos(clock.boot_ns.saturating_sub(boot_ns));
    clock.wall.checked_sub(ago).unwrap_or(clock.wall)
}

/// CLOCK_BOOTTIME at monotonic `at` (now, if it has passed).
fn boot_ns_at(at: Instant, clock: &Clock) -> u64 {
    let ahead = at.saturating_duration_since(clock.now);
    clock
        .boot_ns
        .saturating_add(u64::try_from(ahead.as_nanos()).unwrap_or(u64::MAX))
}

impl World {
    /// Marks an analysis violated and kills all its members, unless it was already.
    pub(in crate::core) fn kill_analysis(
        &mut self,
        key: AnalysisKey,
        reason: Reason,
        limit: Option<u64>,
        clock: &Clock,
    ) {
        if self.registry.mark_violated(key, reason, limit) {
            let pids = self.tree.members(key);
            self.start_kill(Scope::Analysis, reason, key, limit, &pids, clock);
        }
    }
    pub(in crate::core) fn insert(&mut self, node: Node) {
        if let Some(stale) = self.tree.insert(node) {
            self.left_tree(stale.proc_ref());
        }
        self.processes_dirty = true;
    }
    /// A new member of a dying scope joins its kill at once; one of an analysis whose
    /// kill is over (its fork event was still queued) gets a kill of its own.
    pub(in crate::core) fn join_dying_scope(
        &mut self,
        pid: u32,
        ppid: u32,
        analysis: AnalysisKey,
        clock: &Clock,
    ) {
        if let Some(at) = self.jobs.iter().position(|j| j.takes_child(ppid, analysis)) {
            self.lingering.remove(&analysis);
            let mut job = self.jobs.swap_remove(at);
            self.add_target(&mut job, pid, clock);
            self.jobs.push(job);
        } else if let Some((reason, limit)) = self.registry.violation(analysis) {
            self.lingering.remove(&analysis);
            self.runs.resumed(analysis);
            self.start_kill(Scope::Analysis, reason, analysis, limit, &[pid], clock);
        }
    }
    /// Takes a process out of the tree, wherever it went (exit, resync, unregister):
    /// a kill waiting for it is done with it.
    pub(in crate::core) fn remove(&mut self, pid: u32) -> Option<Node> {
        let node = self.tree.remove(pid)?;
        self.left_tree(node.proc_ref());
        self.processes_dirty = true;
        Some(node)
    }
    pub(in crate::core) fn left_tree(&mut self, process: ProcRef) {
        for job in &mut self.jobs {
            job.exited(process);
        }
        if self.earlier_sigterms.remove(&process.pid).is_some() {
            self.actions.push(Action::ForgetKillProgress(process));
        }
    }

    /// The SIGTERMs the pinned map kept from an earlier daemon: those of a process
    /// still running are taken up by the kill that comes for it (its grace then ends
    /// when the earlier one's did); the others' entries go.
    pub(in crate::core) fn resume_sigterms(
        &mut self,
        saved: &[(u32, KillProgress)],
        procs: &dyn Procs,
    ) {
        for &(pid, progress) in saved {
            let process = ProcRef {
                pid,
                start_ns: progress.start_ns,
            };
            let running = procs
                .read(pid)
                .is_some_and(|p| same_start(p.start_ns, progress.start_ns));
            if running {
                self.earlier_sigterms.insert(pid, progress);
            } else {
                self.actions.push(Action::ForgetKillProgress(process));
            }
        }
    }

    /// The kernel sent `process` its memory kill's SIGTERM (`kept`: what its entry
    /// holds): kept as an earlier SIGTERM, with the time it was sent and the end of the
    /// grace it began, for the kill that now comes for it (and, pinned, for a restarted
    /// daemon).
    pub(in crate::core) fn take_up_strike(
        &mut self,
        process: ProcRef,
        analysis: AnalysisKey,
        kept: &KillProgress,
        clock: &Clock,
    ) {
        let grace = self
            .registry
            .get(analysis)
            .map_or_else(|| self.settings.defaults.grace(), |a| a.limits.grace());
        let at = kept.struck_boot_ns;
        let progress = KillProgress {
            start_ns: process.start_ns,
            analysis,
            sigterm_unix_ms: crate::vocab::units::unix_ms(wall_at(at, clock)),
            escalate_boot_ns: at
                .saturating_add(u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX)),
            ..*kept
        };
        self.earlier_sigterms.insert(process.pid, progress);
        self.actions
            .push(Action::SaveKillProgress(process, Box::new(progress)));
    }

    /// The kernel sent `process` SIGTERM at its memory crossing (`struck`, its pinned
    /// entry), and it is out of the tree before any kill took that up: it ended while no
    /// daemon ran, or with its events lost. Its record is made from what the kernel
    /// kept; one whose pid still runs that process was let go (unregistered), and only
    /// said.
    pub(in crate::core) fn record_past_strike(
        &mut self,
        process: ProcRef,
        struck: &KillProgress,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        self.actions.push(Action::ForgetKillProgress(process));
        let running = procs
            .read(process.pid)
            .is_some_and(|p| same_start(p.start_ns, process.start_ns));
        if running {
            tracing::warn!(
                pid = process.pid,
                "the kernel sent SIGTERM at the memory limit to a process no longer watched"
            );
            return;
        }
        let analysis = self.registry.get(struck.analysis);
        let at = rfc3339(wall_at(struck.struck_boot_ns, clock));
        let owner = analysis.map(|a| a.owner);
        let record = KillRecord {
            time: at.clone(),
            host: self.host.clone(),
            pid: process.pid,
            ppid: 0,
            analysis_id: analysis.map(|a| a.id.clone()).unwrap_or_default(),
            reason: Reason::Memory,
            limit: analysis.map(|a| a.limits.memory_bytes),
            rss_bytes: struck.struck_rss,
            runtime_ms: struck.struck_boot_ns.saturating_sub(process.start_ns) / 1_000_000,
            signals: vec![SignalSent {
                signal: format!("{}", Signal::SIGTERM),
                at,
                by: Some("kernel".into()),
            }],
            outcome: Outcome::ExitedAfterSigterm,
            comm: crate::vocab::process::Comm(struck.comm)
                .as_str()
                .into_owned(),
            cmdline: struck_cmdline(struck),
            uid: struck.uid,
            owner_uid: owner,
            warned_of: None,
            zombies: None,
            tree_pss_bytes: None,
            tree_rss_bytes: None,
            shmem_bytes: None,
            shm_left: Vec::new(),
            refused_forks: None,
        };
        self.counters.kernel_strikes += 1;
        self.runs.killed(struck.analysis, &record, false);
        self.keep_record(record, clock);
    }

    /// Records a burst of forks the kernel refused: one record per analysis and burst,
    /// of the process whose fork was refused first, with nothing signalled.
    pub(in crate::core) fn record_refusals(
        &mut self,
        burst: &crate::core::rules::forks::RefusalBurst,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        self.actions.push(Action::RefusalsRecorded {
            analysis: burst.analysis,
            total: burst.total,
        });
        let Some(analysis) = self.registry.get(burst.analysis) else {
            return; // Unregistered since: its entry went with it.
        };
        let node = self.tree.get(burst.pid);
        let details = node
            .map(|n| procs.details(n.proc_ref()))
            .unwrap_or_default();
        let at = rfc3339(wall_at(burst.first_ns, clock));
        tracing::warn!(
            analysis_id = %analysis.id,
            refused = burst.refused,
            max_processes = analysis.limits.max_processes,
            "forks past the process limit were refused"
        );
        let record = KillRecord {
            time: at,
            host: self.host.clone(),
            pid: burst.pid,
            ppid: node.map_or(0, |n| n.ppid),
            analysis_id: analysis.id.clone(),
            reason: Reason::MaxProcesses,
            limit: Some(analysis.limits.max_processes),
            rss_bytes: node.map_or(0, |n| n.rss_bytes()),
            runtime_ms: node.map_or(0, |n| burst.first_ns.saturating_sub(n.start_ns) / 1_000_000),
            signals: Vec::new(),
            outcome: Outcome::Refused,
            comm: node
                .map(|n| n.comm.as_str().into_owned())
                .unwrap_or_default(),
            cmdline: details.cmdline,
            uid: details.uid,
            owner_uid: Some(analysis.owner),
            warned_of: None,
            zombies: None,
            tree_pss_bytes: None,
            tree_rss_bytes: None,
            shmem_bytes: None,
            shm_left: Vec::new(),
            refused_forks: Some(burst.refused),
        };
        self.counters.forks_refused += burst.refused;
        self.keep_record(record, clock);
    }

    /// The earlier daemon's SIGTERM of `process`, if it had one.
    fn earlier_sigterm(&self, process: ProcRef) -> Option<&KillProgress> {
        self.earlier_sigterms
            .get(&process.pid)
            .filter(|p| same_start(p.start_ns, process.start_ns))
    }

    /// [`Self::earlier_sigterm`], taken up by the kill that now covers `process`.
    fn take_earlier_sigterm(&mut self, process: ProcRef) -> Option<KillProgress> {
        self.earlier_sigterm(process)?;
        self.earlier_sigterms.remove(&process.pid)
    }
    /// Forgets an analysis with no process and no kill left (a killed one only after
    /// [`DYING_LINGER`]).
    pub(in crate::core) fn forget_if_finished(&mut self, key: AnalysisKey, clock: &Clock) {
        let launched = !self.registry.launchers_of(key).is_empty();
        if launched || self.tree.has_analysis(key) || self.jobs.iter().any(|j| j.analysis == key) {
            self.lingering.remove(&key);
            return;
        }
        self.runs.ended(key);
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
        self.forgotten.push(key);
        if let Some(roots) = self.registry.forget(key) {
            self.actions.push(Action::ForgetAnalysis(key, roots));
        }
    }
    pub(in crate::core) fn job_spec(
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
    pub(in crate::core) fn start_kill(
        &mut self,
        scope: Scope,
        reason: Reason,
        analysis: AnalysisKey,
        limit: Option<u64>,
        pids: &[u32],
        clock: &Clock,
    ) {
        let spec = self.job_spec(scope, reason, analysis, limit, self.kill_mode());
        self.start_job(spec, pids, clock);
    }
    /// How kills are made: signalled, or (`--dry-run`) only recorded.
    pub(in crate::core) fn kill_mode(&self) -> Mode {
        if self.settings.dry_run {
            Mode::DryRun
        } else {
            Mode::Signal
        }
    }
    pub(in crate::core) fn start_job(&mut self, spec: JobSpec, pids: &[u32], clock: &Clock) {
        tracing::warn!(
            analysis_id = spec.analysis_id,
            reason = spec.reason.as_str(),
            processes = pids.len(),
            dry_run = self.settings.dry_run,
            "limit crossed: killing"
        );
        let mut job = self.new_job(spec, pids, clock);
        job.roots = self
            .registry
            .get(job.analysis)
            .map(|a| a.roots.clone())
            .unwrap_or_default();
        self.jobs.push(job);
        self.processes_dirty = true;
    }
    /// A job of `spec` over `pids`, their first signals queued.
    pub(in crate::core) fn new_job(
        &mut self,
        spec: JobSpec,
        pids: &[u32],
        clock: &Clock,
    ) -> KillJob {
        let mut job = KillJob::new(spec, clock.now, clock.wall);
        // An earlier daemon's grace ends first, before any target is signalled.
        for &pid in pids {
            let earlier = self
                .tree
                .get(pid)
                .and_then(|n| self.earlier_sigterm(n.proc_ref()));
            if let Some(progress) = earlier {
                job.resume_grace(instant_at(progress.escalate_boot_ns, clock));
            }
        }
        for &pid in pids {
            self.add_target(&mut job, pid, clock);
        }
        job
    }
    /// A violation that is recorded, not acted on (orphan policy `log`).
    pub(in crate::core) fn record_only(
        &mut self,
        analysis: AnalysisKey,
        pids: &[u32],
        clock: &Clock,
    ) {
        let spec = self.job_spec(
            Scope::Subtree,
            Reason::Orphan,
            analysis,
            None,
            Mode::LogOnly,
        );
        // Finished once its targets are described, like any job.
        let job = self.new_job(spec, pids, clock);
        self.jobs.push(job);
    }
    pub(in crate::core) fn add_target(&mut self, job: &mut KillJob, pid: u32, clock: &Clock) {
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
        // What only /proc knows (command line, owner) is read by the effects before
        // the first signal: a kill of thousands costs the loop no /proc read.
        let info = TargetInfo {
            process: node.proc_ref(),
            ppid: node.ppid,
            comm: node.comm.as_str().into_owned(),
            cmdline: String::new(),
            uid: 0,
            rss_bytes: node.rss_bytes(),
            runtime_ms: clock.boot_ns.saturating_sub(node.start_ns) / 1_000_000,
        };
        let process = info.process;
        let earlier = self.take_earlier_sigterm(process);
        let mut info = info;
        if let Some(struck) = earlier.filter(|p| p.struck_boot_ns != 0) {
            // What the kernel read at its SIGTERM: /proc may be gone by the time the
            // effects read it.
            (info.cmdline, info.uid) = (struck_cmdline(&struck), struck.uid);
        }
        let earlier = earlier.map(|p| EarlierSigterm {
            at: UNIX_EPOCH + Duration::from_millis(p.sigterm_unix_ms),
            by_kernel: p.struck_boot_ns != 0,
        });
        match job.add(info, clock.now, clock.wall, earlier) {
            Some(FirstAsk::Signal(order)) => {
                self.actions.push(Action::Signal(order));
                if order.signal == Signal::SIGTERM {
                    let progress = KillProgress {
                        start_ns: process.start_ns,
                        analysis: job.analysis,
                        sigterm_unix_ms: crate::vocab::units::unix_ms(clock.wall),
                        escalate_boot_ns: boot_ns_at(job.escalate_at, clock),
                        ..KillProgress::default()
                    };
                    self.actions
                        .push(Action::SaveKillProgress(process, Box::new(progress)));
                }
            }
            Some(FirstAsk::Describe(process)) => self.actions.push(Action::Describe(process)),
            None => {}
        }
    }

    /// A signal could not be delivered (the process is gone, or its pid was recycled).
    pub fn on_signal_failed(&mut self, order: SignalOrder, procs: &dyn Procs, clock: &Clock) {
        for job in &mut self.jobs {
            job.signal_failed(order.target, order.signal);
        }
        self.finish_done_jobs(procs, clock);
    }
    /// Jobs are over once every target has exited *and* the tree has taken in those
    /// exits: until then a target's children look parentless, and the job must still
    /// be there to claim them (else they would be flagged as orphans of this kill).
    pub(in crate::core) fn finish_done_jobs(&mut self, procs: &dyn Procs, clock: &Clock) {
        if !self.jobs.iter().any(KillJob::is_done) {
            return;
        }
        let (done, running): (Vec<KillJob>, Vec<KillJob>) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(KillJob::is_done);
        self.jobs = running;
        for job in done {
            let analysis = job.analysis;
            self.finish(job, procs, clock);
            self.forget_if_finished(analysis, clock);
        }
    }
    /// Records a finished job: one record per process, kept for `status`.
    pub(in crate::core) fn finish(&mut self, job: KillJob, procs: &dyn Procs, clock: &Clock) {
        self.processes_dirty = true;
        for process in job.signalled() {
            self.actions.push(Action::Release(process));
        }
        for process in job.saved_progress() {
            self.actions.push(Action::ForgetKillProgress(process));
        }
        let shm_left = self.shm_left_by(&job, procs);
        for record in job.records(&self.host, shm_left) {
            self.runs
                .killed(job.analysis, &record, job.roots.contains(&record.pid));
            self.keep_record(record, clock);
        }
    }
    /// What a whole analysis' kill leaves in tmpfs: the files its members held and
    /// owned, still there now that they are dead; removed too with `--remove-shm`
    /// (never by a dry run).
    fn shm_left_by(&mut self, job: &KillJob, procs: &dyn Procs) -> Vec<ShmLeft> {
        if job.scope != Scope::Analysis {
            return Vec::new();
        }
        let left = self.shm.left(job.analysis, procs);
        let remove = self.settings.remove_shm && job.mode == Mode::Signal;
        left.into_iter()
            .filter_map(|(file, bytes)| {
                let path = file.path.clone()?;
                if remove {
                    self.actions.push(Action::RemoveShm(file));
                }
                Some(ShmLeft { path, bytes })
            })
            .collect()
    }
    /// Counts a record, keeps it for `status` and hands it to the store.
    pub(in crate::core) fn keep_record(&mut self, record: KillRecord, clock: &Clock) {
        if let Some(owner) = record.owner_uid {
            self.record_rates.count(owner, clock.now);
        }
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
        self.recent_bytes += record.size_bytes();
        self.recent.push_back(record.clone());
        while self.recent.len() > RECORDS_KEPT || self.recent_bytes > RECORDS_KEPT_BYTES {
            let Some(oldest) = self.recent.pop_front() else {
                break;
            };
            self.recent_bytes -= oldest.size_bytes();
        }
        self.actions.push(Action::Record(Box::new(record)));
    }

    /// What the effects read of targets before their first signal (`described`) and
    /// the first signals that could not be sent (`not_sent`: gone, or their pid names
    /// another process now): their records are whole; one described after its grace
    /// ended gets its SIGKILL now. The failures are taken in first, so that no job is
    /// finished with a signal it never sent.
    pub fn on_described(
        &mut self,
        described: &[(ProcRef, Details)],
        not_sent: &[SignalOrder],
        procs: &dyn Procs,
        clock: &Clock,
    ) {
        for order in not_sent {
            for job in &mut self.jobs {
                job.signal_failed(order.target, order.signal);
            }
        }
        for (process, details) in described {
            for job in &mut self.jobs {
                if let Some(order) = job.describe(*process, details, clock.wall) {
                    self.actions.push(Action::Signal(order));
                }
            }
        }
        self.finish_done_jobs(procs, clock);
    }

    /// Graces that ended: SIGKILL for what is still alive. A whole analysis' kill also
    /// has the kernel kill its members at their forks from then on: one SIGKILL at a
    /// time could never outrun a fork bomb.
    pub fn graces_due(&mut self, clock: &Clock) {
        for job in &mut self.jobs {
            let escalating = !job.escalated();
            for order in job.escalate(clock.now, clock.wall) {
                self.actions.push(Action::Signal(order));
            }
            if escalating
                && job.escalated()
                && job.scope == Scope::Analysis
                && job.mode == Mode::Signal
            {
                self.actions.push(Action::StopForks(job.analysis));
            }
        }
    }

    /// Killed analyses whose lingering is over are forgotten.
    pub fn lingering_due(&mut self, clock: &Clock) {
        let expired: Vec<AnalysisKey> = self
            .lingering
            .iter()
            .filter(|(_, at)| **at <= clock.now)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            self.forget_if_finished(key, clock);
        }
    }
}
