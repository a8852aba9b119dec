//! A registration taken in: checked by the access rules, put in the kernel map by the
//! effects (through [`Watch`]), then adopted here; and unregistration.

use std::collections::HashSet;

use anyhow::{Result, bail};

use crate::{
    core::{
        procs::{ProcInfo, Procs},
        registry::{self, Launch, Root},
        tree::Node,
        world::{Action, Clock, World},
    },
    vocab::error::Error,
    vocab::{
        limits::Limits,
        peer::Peer,
        process::{AnalysisKey, Comm, ProcRef},
    },
};
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
    pub run: AnalysisKey,
}
/// What a registration needs of the outside world.
pub trait Watch {
    /// Makes the kernel put each child the launch's root forks in its analysis.
    fn launch(&mut self, registration: &Registration) -> Result<()>;

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
/// The tree's node for a process /proc (or the kernel's walk) described.
pub fn node_of(info: &ProcInfo, key: AnalysisKey) -> Node {
    Node::new(
        info.pid,
        info.ppid,
        info.start_ns,
        Comm::new(&info.comm),
        key,
    )
}

impl World {
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
            bail!(Error::not_found(format!(
                "pid {} exited while it was being registered",
                root.pid
            )));
        }
        if new_analysis {
            self.create_analysis(key, &analysis_id, &limits, owner, clock);
        }
        for info in watched {
            self.insert(node_of(info, key));
            self.join_dying_scope(info.pid, info.ppid, key, clock);
        }
        let root_ref = ProcRef {
            pid: root.pid,
            start_ns: root.start_ns,
        };
        let launcher = launcher.map(|l| ProcRef {
            pid: l.pid,
            start_ns: l.start_ns,
        });
        self.add_root(root_ref, key, launcher);
        let watched = self.tree.member_count(key);
        tracing::info!(pid = root.pid, analysis_id, watched, "registered");
        Ok(Registered {
            pid: root.pid,
            analysis_id,
            watched,
            run: key,
        })
    }
    /// Takes in a checked launch (`registration.root` is the launcher): its analysis is
    /// made now, so its clock runs from the launch, and from now on the kernel puts
    /// each child the launcher forks in it, the launcher itself never a member.
    pub fn launch(&mut self, registration: Registration, clock: &Clock) -> Registered {
        let Registration {
            root,
            analysis_id,
            key,
            new_analysis,
            limits,
            owner,
            ..
        } = registration;
        if new_analysis {
            self.create_analysis(key, &analysis_id, &limits, owner, clock);
        }
        let process = root.proc_ref();
        self.registry.add_launch(Launch {
            process,
            analysis: key,
        });
        // Its exit ends the launch (and makes orphans of the roots it started).
        self.actions.push(Action::WatchLauncher {
            root: process,
            launcher: process,
        });
        tracing::info!(pid = root.pid, analysis_id, "launching");
        Registered {
            pid: root.pid,
            watched: self.tree.member_count(key),
            analysis_id,
            run: key,
        }
    }

    /// Makes the analysis a registration checked as new (its clock starts now), and
    /// saves it in the kernel map for a restarted daemon.
    fn create_analysis(
        &mut self,
        key: AnalysisKey,
        analysis_id: &str,
        limits: &Limits,
        owner: u32,
        clock: &Clock,
    ) {
        let made = self
            .registry
            .create(analysis_id, limits, owner, clock.now, clock.wall);
        debug_assert_eq!(made, key);
        let entry = registry::entry_from_analysis(self.registry.get(key).expect("just made"));
        self.actions
            .push(Action::SaveAnalysis(key, Box::new(entry)));
    }

    /// Ends the launch of `process` (it exited, or its analysis was unregistered);
    /// false when it was none.
    pub fn end_launch(&mut self, process: ProcRef, clock: &Clock) -> bool {
        let Some(launch) = self.registry.end_launch(process) else {
            return false;
        };
        self.actions.push(Action::Unlaunch(process));
        self.forget_if_finished(launch.analysis, clock);
        true
    }

    /// A child a launcher forked, put in the analysis by the kernel: a root of it,
    /// orphaned when its launcher dies.
    pub(in crate::core) fn adopt_launched(&mut self, child: ProcRef, ppid: u32, key: AnalysisKey) {
        let launcher = self
            .registry
            .launch_of(ppid)
            .filter(|l| l.analysis == key)
            .map(|l| l.process)
            .or_else(|| self.registry.launchers_of(key).first().copied());
        self.add_root(child, key, launcher);
    }

    /// `process` is a root of analysis `key`: kept, pinned for a restarted daemon, and
    /// orphaned when `launcher` (if it has one) exits.
    fn add_root(&mut self, process: ProcRef, key: AnalysisKey, launcher: Option<ProcRef>) {
        let root = Root {
            process,
            analysis: key,
            launcher,
        };
        self.registry.add_root(root);
        self.actions.push(Action::SaveRoot(
            process.pid,
            registry::entry_from_root(&root),
        ));
        if let Some(launcher) = launcher {
            self.actions.push(Action::WatchLauncher {
                root: process,
                launcher,
            });
        }
    }

    /// What an unregister of `pid` (with its subtree) or of analysis `analysis_id`
    /// would remove, once `caller` is found allowed to.
    fn pids_to_unregister(
        &self,
        pid: Option<u32>,
        analysis_id: Option<&str>,
        caller: &Peer,
        procs: &dyn Procs,
    ) -> Result<Vec<u32>> {
        let confined_to = (!self.is_admin(caller)).then_some(caller.uid);
        let pids = match (pid, analysis_id) {
            (Some(pid), None) => {
                let Some(node) = self.tree.get(pid) else {
                    bail!(Error::not_found(format!(
                        "pid {pid} is not watched: see `watchdog-user dump-tree`"
                    )));
                };
                let subtree = self.tree.subtree(pid);
                if let Some(uid) = confined_to {
                    let runs_as = procs.uids(node.proc_ref());
                    if let Some(runs_as) = runs_as.filter(|r| !r.only(uid)) {
                        bail!(Error::refused(format!(
                            "refused by rule own-processes: pid {pid} ({}) runs as {runs_as}, \
                             and you are uid {uid}: only root or a member of the admin group \
                             may unregister another user's processes (nothing was \
                             unregistered)",
                            node.comm.as_str()
                        )));
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
                    bail!(Error::not_found(format!(
                        "no analysis {id:?} is watched: see `watchdog-user dump-tree`"
                    )));
                };
                if let Some(uid) = confined_to {
                    self.check_own_analysis(key, uid, "unregister")?;
                }
                self.tree.members(key)
            }
            _ => bail!(Error::bad_request(
                "unregister takes exactly one of --pid or --analysis-id"
            )),
        };
        Ok(pids)
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
        let pids = self.pids_to_unregister(pid, analysis_id, caller, procs)?;
        let mut analyses = HashSet::new();
        for &pid in &pids {
            if let Some(process) = self.tree.get(pid).map(|n| n.proc_ref()) {
                for job in &mut self.jobs {
                    job.release(process);
                }
            }
            if let Some(node) = self.remove(pid) {
                self.actions.push(Action::Unwatch(node.proc_ref()));
                analyses.insert(node.analysis);
            }
        }
        let launches = match analysis_id.and_then(|id| self.registry.key(id)) {
            Some(key) => self.registry.launchers_of(key),
            None => Vec::new(),
        };
        for launcher in launches {
            self.end_launch(launcher, clock);
        }
        for key in analyses {
            self.forget_if_finished(key, clock);
        }
        // A kill whose targets were all let go is over: its records go out now.
        self.finish_done_jobs(procs, clock);
        tracing::info!(
            ?pid,
            ?analysis_id,
            uid = caller.uid,
            removed = pids.len(),
            "unregistered"
        );
        Ok(pids.len())
    }
}
