//! Who may ask for what: root and the admin group anything; anyone else may watch and
//! unwatch only processes running as itself (real uid), in analyses it created. Checked
//! before anything is touched, so a refused request changes nothing.

use anyhow::{Result, bail};

use crate::{
    core::{
        procs::{ProcInfo, Procs},
        registration::Registration,
        world::{MAX_ANALYSIS_ID, World},
    },
    vocab::error::Error,
    vocab::{
        limits::{LimitOverrides, Limits},
        peer::Peer,
        process::{AnalysisKey, ProcRef},
    },
};
/// The limits of a running analysis that a registration joins: its own. A request that
/// asks for others is refused, naming them, rather than silently run under limits it
/// did not ask for.
fn joined_limits(
    analysis_id: &str,
    running: &Limits,
    overrides: &LimitOverrides,
) -> Result<Limits> {
    let asked = running.with(overrides).map_err(Error::bad_request)?;
    if asked == *running {
        return Ok(asked);
    }
    let differ: Vec<String> = running
        .shown()
        .into_iter()
        .zip(asked.shown())
        .filter(|(theirs, ours)| theirs != ours)
        .map(|((name, theirs), (_, ours))| format!("{name} {theirs} (asked: {ours})"))
        .collect();
    bail!(Error::refused(format!(
        "analysis {analysis_id:?} is running with other limits: {}; a registration into it \
         takes its limits: leave those out, ask for the same, or pick another \
         --analysis-id (nothing was registered)",
        differ.join(", ")
    )))
}

/// The refusal of what only root and the admin group may do (test faults), to a caller
/// that is neither ([`Core::is_admin`]).
pub fn admin_only(caller: &Peer, what: &str) -> anyhow::Error {
    Error::refused(format!(
        "refused by rule admin-only: {what} is for root and members of the admin group \
         (--admin-group), and you are uid {}",
        caller.uid
    ))
    .into()
}

impl World {
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
        check_analysis_id(analysis_id)?;
        let root = self.watchable(pid, procs)?;
        let confined_to = (!self.is_admin(caller)).then_some(caller.uid);
        if let Some(uid) = confined_to {
            self.check_own_process(&root, uid, None, procs)?;
        }
        if let Some(node) = self.tree.get(pid) {
            let current = self.registry.id(node.analysis).unwrap_or("?");
            if current != analysis_id {
                bail!(Error::refused(format!(
                    "pid {pid} is already watched as part of analysis {current:?}: unregister it first"
                )));
            }
        }
        self.refuse_dying(pid, root.ppid)?;
        let existing = self.registry.joinable(analysis_id);
        self.check_pinned_room(existing.is_none())?;
        if let Some(uid) = confined_to {
            self.check_quotas(uid, existing.is_none())?;
        }
        if let (Some(uid), Some(key)) = (confined_to, existing) {
            let owner = self.registry.get(key).map_or(0, |a| a.owner);
            if owner != uid {
                bail!(Error::refused(format!(
                    "refused by rule own-analyses: analysis {analysis_id:?} was created by uid \
                     {owner}, and you are uid {uid}: only its owner, root or a member of the \
                     admin group may add processes to it; pick another --analysis-id (nothing \
                     was registered)"
                )));
            }
        }
        let limits = self
            .settings
            .defaults
            .with(overrides)
            .map_err(|e| Error::bad_request(format!("{e}: nothing was registered")))?;
        self.settings.check_reachable(overrides)?;
        let limits = match existing.and_then(|key| self.registry.get(key)) {
            Some(running) => joined_limits(analysis_id, &running.limits, overrides)?,
            None => limits,
        };
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
    /// Checks a launch: as a registration, and the launcher must be neither a member
    /// (what it starts is watched already) nor a launcher already.
    pub fn check_launch(
        &self,
        pid: u32,
        analysis_id: &str,
        overrides: &LimitOverrides,
        caller: &Peer,
        procs: &dyn Procs,
    ) -> Result<Registration> {
        if let Some(node) = self.tree.get(pid) {
            let id = self.registry.id(node.analysis).unwrap_or("?");
            bail!(Error::refused(format!(
                "pid {pid} is watched as part of analysis {id:?}: what it starts is watched \
                 already, so it cannot launch another (nothing was changed)"
            )));
        }
        if let Some(launch) = self.registry.launch_of(pid) {
            let id = self.registry.id(launch.analysis).unwrap_or("?");
            bail!(Error::refused(format!(
                "pid {pid} launches analysis {id:?} already: one launch per process; end \
                 that one first (unregister --analysis-id {id:?})"
            )));
        }
        self.check_register(pid, analysis_id, overrides, caller, procs)
    }

    /// Refuses a registration the pinned maps have no room for (a new analysis, a new
    /// root): an "ok" that a restart would forget must never be given.
    fn check_pinned_room(&self, new_analysis: bool) -> Result<()> {
        let cap = watchdog_common::MAX_ANALYSES as usize;
        let full = if new_analysis && self.registry.len() >= cap {
            Some("analyses")
        } else if self.registry.roots_total() >= cap {
            Some("registered roots")
        } else {
            None
        };
        if let Some(what) = full {
            bail!(Error::unavailable(format!(
                "the watchdog holds {cap} {what}, as many as its pinned state keeps across \
                 restarts: nothing was registered; wait for some to end, or join a running \
                 analysis (status shows the fill)"
            )));
        }
        Ok(())
    }

    /// Refuses a registration past what one user may hold (root and the admin group are
    /// not counted): a new analysis past `--user-max-analyses`, a new root past
    /// `--user-max-roots`, any past `--user-max-processes` watched processes in its
    /// analyses or `--user-max-records-per-minute`.
    fn check_quotas(&self, uid: u32, new_analysis: bool) -> Result<()> {
        let (analyses, roots) = self.registry.owned_by(uid);
        let quotas = self.settings.quotas;
        let over = if new_analysis && analyses >= quotas.analyses {
            Some((
                "analyses-per-user",
                analyses,
                "analyses",
                "--user-max-analyses",
            ))
        } else if roots >= quotas.roots {
            Some((
                "roots-per-user",
                roots,
                "registered roots",
                "--user-max-roots",
            ))
        } else {
            None
        };
        let processes: u64 = self
            .registry
            .keys_owned_by(uid)
            .map(|key| self.tree.member_count(key) as u64)
            .sum();
        if over.is_none() && processes >= quotas.processes {
            bail!(Error::refused(format!(
                "refused by quota processes-per-user: your (uid {uid}) analyses hold {processes} \
                 watched processes, the most one user's may hold at once \
                 (--user-max-processes): wait for some to end (nothing was registered)"
            )));
        }
        let records = self.record_rates.in_window(uid);
        if over.is_none() && records >= quotas.records_per_minute {
            bail!(Error::refused(format!(
                "refused by quota records-per-minute: your (uid {uid}) analyses made {records} \
                 kill records in the last minute, the most one user's may make \
                 (--user-max-records-per-minute): every one of them is kept; register again \
                 once the minute has passed (nothing was registered)"
            )));
        }
        if let Some((quota, held, what, flag)) = over {
            bail!(Error::refused(format!(
                "refused by quota {quota}: you (uid {uid}) hold {held} {what}, the most one \
                 user may hold at once ({flag}): wait for some to end, or join one of your \
                 running analyses (nothing was registered)"
            )));
        }
        Ok(())
    }

    /// Refuses a process of a run being killed (or forked by one: its fork event may
    /// still be queued): registering it again must not take it out of the kill.
    fn refuse_dying(&self, pid: u32, ppid: u32) -> Result<()> {
        for member in [pid, ppid] {
            let Some(node) = self.tree.get(member) else {
                continue;
            };
            if let Some((reason, _)) = self.registry.violation(node.analysis) {
                let id = self.registry.id(node.analysis).unwrap_or("?");
                bail!(Error::refused(format!(
                    "pid {pid} is being killed with analysis {id:?} ({}): it cannot be \
                     registered again (nothing was registered)",
                    reason.as_str()
                )));
            }
        }
        Ok(())
    }

    /// The process `pid`, if the watchdog may watch it at all: not init, not itself,
    /// not a kernel thread, and living.
    fn watchable(&self, pid: u32, procs: &dyn Procs) -> Result<ProcInfo> {
        if pid == 0 || pid == 1 {
            bail!(Error::refused(format!(
                "refusing to watch pid {pid}: it is the system's init/idle task, which the watchdog never touches"
            )));
        }
        if pid == self.self_pid {
            bail!(Error::refused(format!(
                "refusing to watch pid {pid}: it is the watchdog daemon itself"
            )));
        }
        let Some(root) = procs.read(pid) else {
            bail!(Error::not_found(format!(
                "no process with pid {pid}: check the pid (the process may have exited)"
            )));
        };
        if root.kernel_thread {
            bail!(Error::refused(format!(
                "pid {pid} ({}) is a kernel thread: only user processes can be watched",
                root.comm
            )));
        }
        Ok(root)
    }

    /// Refuses a process that does not run as `uid` (its real uid); `root_pid` names
    /// the registered root when `process` is one of its descendants. A process gone
    /// meanwhile is no refusal: nothing of it can be watched.
    pub(in crate::core) fn check_own_process(
        &self,
        process: &ProcInfo,
        uid: u32,
        root_pid: Option<u32>,
        procs: &dyn Procs,
    ) -> Result<()> {
        let Some(runs_as) = procs.uids(process.proc_ref()) else {
            if root_pid.is_none() {
                bail!(Error::not_found(format!(
                    "no process with pid {}: check the pid (the process may have exited)",
                    process.pid
                )));
            }
            return Ok(());
        };
        if runs_as.only(uid) {
            return Ok(());
        }
        let what = match root_pid {
            None => format!("pid {} ({})", process.pid, process.comm),
            Some(root) => format!(
                "pid {} ({}), a descendant of pid {root},",
                process.pid, process.comm
            ),
        };
        bail!(Error::refused(format!(
            "refused by rule own-processes: {what} runs as {runs_as}, and you are uid \
             {uid}: only root or a member of the admin group may watch another user's \
             processes (a setuid program is its owner's); register a process of your own \
             (nothing was registered)"
        )))
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
    /// Refuses `doing` to an analysis `uid` did not create.
    pub(in crate::core) fn check_own_analysis(
        &self,
        key: AnalysisKey,
        uid: u32,
        doing: &str,
    ) -> Result<()> {
        let Some(analysis) = self.registry.get(key) else {
            return Ok(());
        };
        if analysis.owner != uid {
            bail!(Error::refused(format!(
                "refused by rule own-analyses: analysis {:?} was created by uid {}, and you \
                 are uid {uid}: only its owner, root or a member of the admin group may \
                 {doing} it (nothing was unregistered)",
                analysis.id, analysis.owner
            )));
        }
        Ok(())
    }
}

/// An analysis id is a label: not empty, and short enough for the kernel map.
fn check_analysis_id(analysis_id: &str) -> Result<()> {
    if analysis_id.trim().is_empty() {
        bail!(Error::bad_request(
            "the analysis id is empty: pass --analysis-id with a name for the analysis"
        ));
    }
    if analysis_id.len() > MAX_ANALYSIS_ID {
        bail!(Error::bad_request(format!(
            "the analysis id is {} bytes long: use at most {MAX_ANALYSIS_ID}",
            analysis_id.len()
        )));
    }
    Ok(())
}
