//! Warnings: at `--warn-at` of a limit, the analysis' living roots are sent the warning
//! signal, once per limit, and the warning is recorded.

use crate::{
    core::{
        kill::SignalOrder,
        procs::Procs,
        tree::Node,
        world::{Action, Clock, World},
    },
    vocab::{
        limits::Reason,
        process::AnalysisKey,
        record::{KillRecord, Outcome},
    },
};
impl World {
    /// Sends the warning signal to the analysis' living roots, once per limit (`of`),
    /// and records it (reason `warning`, outcome `warned`, the limit warned of). A
    /// dying analysis is warned of nothing. In a dry run it is recorded, not sent.
    pub(in crate::core) fn warn(
        &mut self,
        key: AnalysisKey,
        of: Reason,
        limit: u64,
        procs: &dyn Procs,
        clock: &Clock,
    ) {
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
            let details = procs.details(root.proc_ref());
            let outcome = self.send_warning(&root, signal);
            self.keep_record(
                KillRecord {
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
                        by: None,
                    }],
                    outcome,
                    comm: root.comm.as_str().into_owned(),
                    cmdline: details.cmdline,
                    uid: details.uid,
                    owner_uid: Some(owner),
                    warned_of: Some(of),
                    zombies: None,
                    tree_pss_bytes: None,
                    shmem_bytes: None,
                    shm_left: Vec::new(),
                    refused_forks: None,
                    tree_rss_bytes: None,
                },
                clock,
            );
        }
    }

    /// The warning signal to `root` (none in a dry run): the outcome its record gets.
    fn send_warning(&mut self, root: &Node, signal: nix::sys::signal::Signal) -> Outcome {
        if self.settings.dry_run {
            return Outcome::DryRun;
        }
        self.actions.push(Action::Signal(SignalOrder {
            target: root.proc_ref(),
            signal,
            describe: false,
        }));
        if !self.jobs.iter().any(|j| j.target_pending(root.pid)) {
            self.actions.push(Action::Release(root.proc_ref()));
        }
        Outcome::Warned
    }
}
