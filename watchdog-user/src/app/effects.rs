//! The edges: carries out the rules' [`Action`]s on the world — the kernel maps,
//! signals through pidfds, watches on roots' launchers, the store — and does the I/O
//! of a registration (putting a root and its descendants in the kernel map, checking
//! each is still the process it was).

use crate::os::pidfd::{OpenError, PidFd};
use std::collections::{HashMap, HashSet};

use anyhow::Result;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    core::{
        Action, Registration, Retrack, Watch,
        kill::SignalOrder,
        procs::{Details, ProcInfo, Procs as _},
    },
    kernel::Kernel,
    os::procs::{self, SysProcs},
    store::StoreMsg,
    vocab::{
        limits::RssLevels,
        process::{AnalysisKey, ProcRef},
        record::KillRecord,
    },
};

/// What the world answered that the rules must hear.
#[derive(Debug)]
pub enum Feedback {
    SignalFailed(SignalOrder),
}

/// A kill target described off the loop: what its record tells of it, read before its
/// first signal, and what became of that signal.
pub struct Described {
    pub process: ProcRef,
    pub details: Details,
    pub signal: Option<(SignalOrder, Delivery)>,
}

/// What became of a first signal sent off the loop.
pub enum Delivery {
    /// Sent, through this pidfd (kept for the SIGKILL after the grace).
    Sent(PidFd),
    /// Gone (or its pid names another process now), or never to be signalled.
    NotSent,
    /// No pidfd could be had (e.g. EMFILE): it stays a target, tried again later.
    NoPidfd(std::io::Error),
}

/// The first signals and descriptions of one batch of actions, done together.
enum FirstLook {
    Signal(SignalOrder),
    Describe(ProcRef),
}

pub struct Effects {
    pub kernel: Kernel,
    /// Pidfds of processes being killed, opened at their first signal.
    pidfds: HashMap<ProcRef, PidFd>,
    store: mpsc::UnboundedSender<StoreMsg>,
    /// Where launcher watches report a launcher's exit.
    launcher_exits: mpsc::UnboundedSender<ProcRef>,
    /// One watch per launcher, however many roots it started; dropped with its last
    /// root, so descriptors do not grow with registrations.
    launchers: HashMap<ProcRef, LauncherWatch>,
    /// Descriptors that could not be opened, and signals that could not be sent for
    /// another reason than the process being gone.
    pub pidfd_failures: u64,
    /// SIGTERM times the pinned map could not take.
    pub kill_progress_unsaved: u64,
    /// Files left in tmpfs by killed analyses that `--remove-shm` could not remove.
    pub shm_unremoved: u64,
    self_pid: u32,
    /// Records the store did not take (its task had stopped): kept for the shutdown,
    /// which spools them directly.
    unqueued: Vec<KillRecord>,
    /// Where the targets described off the loop come back.
    described: mpsc::UnboundedSender<Vec<Described>>,
}

/// A launcher being watched, and the roots it started.
struct LauncherWatch {
    roots: HashSet<ProcRef>,
    /// The task waiting on its pidfd; None where no pidfd could be had and the
    /// launcher is checked in /proc at each [`Effects::check_polled_launchers`].
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for LauncherWatch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Effects {
    pub fn new(
        kernel: Kernel,
        store: mpsc::UnboundedSender<StoreMsg>,
        launcher_exits: mpsc::UnboundedSender<ProcRef>,
        described: mpsc::UnboundedSender<Vec<Described>>,
    ) -> Self {
        Self {
            kernel,
            pidfds: HashMap::new(),
            store,
            launcher_exits,
            launchers: HashMap::new(),
            pidfd_failures: 0,
            kill_progress_unsaved: 0,
            shm_unremoved: 0,
            self_pid: std::process::id(),
            unqueued: Vec::new(),
            described,
        }
    }

    /// Launchers watched now (one descriptor each, at most).
    pub fn launchers_watched(&self) -> usize {
        self.launchers.len()
    }

    pub fn store(&self) -> &mpsc::UnboundedSender<StoreMsg> {
        &self.store
    }

    /// How many records the store did not take.
    pub fn unqueued(&self) -> usize {
        self.unqueued.len()
    }

    /// The records the store did not take, for the shutdown to spool.
    pub fn take_unqueued(&mut self) -> Vec<KillRecord> {
        std::mem::take(&mut self.unqueued)
    }

    /// Carries out the actions in order; returns what the rules must hear back.
    pub fn apply(&mut self, actions: Vec<Action>) -> Vec<Feedback> {
        let mut feedback = Vec::new();
        // The records go to the store together: a tree killed at once is one spool write
        // and one fsync.
        let mut records = Vec::new();
        let mut first_looks = Vec::new();
        for action in actions {
            match action {
                Action::Unwatch(process) => {
                    self.kernel.unwatch(process);
                }
                Action::SaveAnalysis(key, entry) => {
                    if let Err(err) = self.kernel.save_analysis(key, &entry) {
                        tracing::error!("{err:#}: a restarted daemon will not know this analysis");
                    }
                }
                Action::ForgetAnalysis(key, roots) => {
                    self.kernel.forget_analysis(key, &roots);
                    self.forget_launchers_of(&roots);
                }
                Action::SaveRoot(pid, entry) => {
                    if let Err(err) = self.kernel.save_root(pid, &entry) {
                        tracing::error!("{err:#}: a restarted daemon will not know this root");
                    }
                }
                Action::WatchLauncher { root, launcher } => self.watch_launcher(root, launcher),
                Action::Unlaunch(launcher) => self.kernel.unlaunch(launcher),
                Action::ForgetRoot(pid) => self.kernel.forget_root(pid),
                Action::StopForks(key) => {
                    if let Err(err) = self.kernel.stop_forks(key) {
                        tracing::error!(
                            "{err:#}: its members' forks are killed by the daemon alone"
                        );
                    }
                }
                Action::SaveKillProgress(process, progress) => {
                    self.save_kill_progress(process, &progress)
                }
                Action::ForgetKillProgress(process) => self.kernel.forget_kill_progress(process),
                Action::ForgetParentWatch(process) => {
                    self.forget_launcher_watches(|root| *root == process)
                }
                Action::Signal(order) if order.describe => {
                    first_looks.push(FirstLook::Signal(order));
                }
                Action::Describe(process) => first_looks.push(FirstLook::Describe(process)),
                Action::Signal(order) => {
                    if !self.signal(order) {
                        feedback.push(Feedback::SignalFailed(order));
                    }
                }
                Action::Release(process) => {
                    self.pidfds.remove(&process);
                }
                Action::RemoveShm(file) => self.remove_shm(&file),
                Action::RefusalsRecorded { analysis, total } => {
                    self.kernel.refusals_recorded(analysis, total)
                }
                Action::Record(record) => {
                    tracing::warn!(target: "kill_event", "{}", serde_json::to_string(&record).expect("records serialize"));
                    records.push(*record);
                }
            }
        }
        self.look_off_loop(first_looks);
        if !records.is_empty()
            && let Err(mpsc::error::SendError(StoreMsg::Records(records))) =
                self.store.send(StoreMsg::Records(records))
        {
            self.unqueued.extend(records);
        }
        feedback
    }

    /// Signals one process through a pidfd bound to it; false when it is gone (or its
    /// pid names another process now), or must never be signalled.
    fn signal(&mut self, order: SignalOrder) -> bool {
        let pidfd = match self.pidfds.entry(order.target) {
            std::collections::hash_map::Entry::Occupied(held) => held.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                match open_for_signal(order.target, self.self_pid) {
                    Ok(pidfd) => slot.insert(pidfd),
                    Err(OpenError::Gone) => return false,
                    Err(OpenError::Failed(err)) => {
                        self.no_pidfd(order.target, &err);
                        return true;
                    }
                }
            }
        };
        match pidfd.signal(order.signal) {
            Ok(()) => true,
            // ESRCH: it exited between our checks: nothing to do, nobody else hit.
            Err(err) => {
                tracing::debug!(pid = order.target.pid, "signal not delivered: {err}");
                self.pidfds.remove(&order.target);
                false
            }
        }
    }

    /// The first failure is said; each is counted. The kill goes on: only a daemon
    /// restarted during it would give its grace again.
    fn save_kill_progress(&mut self, process: ProcRef, progress: &watchdog_common::KillProgress) {
        if let Err(err) = self.kernel.save_kill_progress(process, progress) {
            if self.kill_progress_unsaved == 0 {
                tracing::error!(
                    "{err:#}: a daemon restarted during this kill would start its grace again (counted in watchdog_kill_progress_unsaved_total)"
                );
            }
            self.kill_progress_unsaved += 1;
        }
    }

    /// Removes a file a killed analysis left in tmpfs; one line either way, and a
    /// failure counted.
    fn remove_shm(&mut self, file: &crate::core::procs::ShmFile) {
        let path = file.path.as_deref().unwrap_or_default();
        match crate::os::shmem::remove(file) {
            Ok(bytes) => tracing::info!(
                path,
                bytes,
                "removed a file the killed analysis left in tmpfs"
            ),
            Err(err) => {
                self.shm_unremoved += 1;
                tracing::error!(
                    "{err:#}: {path} is left in place (counted in watchdog_shm_unremoved_total)"
                );
            }
        }
    }

    /// Not gone, but no pidfd: it stays a target, and the next signal (SIGKILL after
    /// the grace) tries again.
    fn no_pidfd(&mut self, process: ProcRef, err: &std::io::Error) {
        self.pidfd_failures += 1;
        tracing::error!(pid = process.pid, "cannot open a pidfd to signal it: {err}");
    }

    /// Reads what the records of new kill targets tell of them (command line, owner,
    /// RSS: three /proc reads each) and sends their first signals, in a blocking task
    /// off the loop, each target read before it is signalled; the outcome comes back
    /// through `described` as one input.
    fn look_off_loop(&self, looks: Vec<FirstLook>) {
        if looks.is_empty() {
            return;
        }
        let (back, self_pid) = (self.described.clone(), self.self_pid);
        tokio::task::spawn_blocking(move || {
            let _outranking = crate::os::host::KillingPriority::take();
            // Every target yields the CPU first (cheap), so that reading the
            // descriptions of hundreds of spinning targets is not slowed by them.
            let opened: Vec<(FirstLook, Option<Result<PidFd, OpenError>>)> = looks
                .into_iter()
                .map(|look| {
                    let FirstLook::Signal(order) = look else {
                        return (look, None);
                    };
                    let pidfd = open_for_signal(order.target, self_pid);
                    if let Ok(pidfd) = &pidfd {
                        pidfd.yield_cpu(order.target.pid);
                    }
                    (look, Some(pidfd))
                })
                .collect();
            let described = opened
                .into_iter()
                .map(|(look, pidfd)| first_look(look, pidfd))
                .collect();
            let _ = back.send(described);
        });
    }

    /// A batch described off the loop, settled: the pidfds kept, what the core must
    /// hear returned (the descriptions, and the first signals that were not sent).
    pub fn take_described(
        &mut self,
        batch: Vec<Described>,
    ) -> (Vec<(ProcRef, Details)>, Vec<SignalOrder>) {
        let mut not_sent = Vec::new();
        let mut details = Vec::with_capacity(batch.len());
        for described in batch {
            match described.signal {
                Some((_, Delivery::Sent(pidfd))) => {
                    self.pidfds.insert(described.process, pidfd);
                }
                Some((order, Delivery::NotSent)) => not_sent.push(order),
                Some((_, Delivery::NoPidfd(err))) => self.no_pidfd(described.process, &err),
                None => {}
            }
            details.push((described.process, described.details));
        }
        (details, not_sent)
    }

    /// The process that started a registered root is not watched, so its exit sends no
    /// event: watch it through a pidfd, which polls readable the moment it exits. One
    /// watch per launcher, shared by the roots it started. Where no pidfd can be had
    /// (out of descriptors), it is said, counted, and the launcher is checked in /proc
    /// at every [`Self::check_polled_launchers`] instead: never left unwatched.
    fn watch_launcher(&mut self, root: ProcRef, launcher: ProcRef) {
        if let Some(watch) = self.launchers.get_mut(&launcher) {
            watch.roots.insert(root);
            return;
        }
        let task = match PidFd::open_verified(launcher).map(|fd| self.await_exit(launcher, fd)) {
            Ok(Ok(task)) => Some(task),
            Err(OpenError::Gone) => {
                // Gone already: the rules hear it as an exit now.
                let _ = self.launcher_exits.send(launcher);
                None
            }
            Err(OpenError::Failed(err)) | Ok(Err(err)) => {
                self.pidfd_failures += 1;
                tracing::warn!(
                    launcher = launcher.pid,
                    "cannot watch the launcher of root {} through a pidfd ({err}): checking it in /proc every 200 ms instead",
                    root.pid
                );
                None
            }
        };
        let roots = HashSet::from([root]);
        self.launchers
            .insert(launcher, LauncherWatch { roots, task });
    }

    /// A task that reports `launcher` once its pidfd polls readable (it exited).
    fn await_exit(
        &self,
        launcher: ProcRef,
        pidfd: PidFd,
    ) -> std::io::Result<tokio::task::AbortHandle> {
        // SAFETY: PidFd owns its fd and keeps it open, unchanged, for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }?;
        let tx = self.launcher_exits.clone();
        let task = tokio::spawn(async move {
            if fd.readable().await.is_ok() {
                let _ = tx.send(launcher);
            }
        });
        Ok(task.abort_handle())
    }

    /// The roots `launcher` started, now that it exited; its watch is over.
    pub fn launcher_exited(&mut self, launcher: ProcRef) -> Vec<ProcRef> {
        self.launchers
            .remove(&launcher)
            .map(|watch| watch.roots.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Launchers watched without a pidfd: those that exited, reported like the others.
    pub fn check_polled_launchers(&mut self) {
        for (launcher, watch) in &self.launchers {
            let alive = || procs::read_same(*launcher).is_some();
            if watch.task.is_none() && !alive() {
                let _ = self.launcher_exits.send(*launcher);
            }
        }
    }

    /// Roots that are over: their launchers' watches end with the last of them.
    fn forget_launchers_of(&mut self, roots: &[u32]) {
        let gone: HashSet<u32> = roots.iter().copied().collect();
        self.forget_launcher_watches(|root| gone.contains(&root.pid));
    }

    /// The watched processes that are over leave their launchers' watches, which end
    /// with the last of them.
    fn forget_launcher_watches(&mut self, over: impl Fn(&ProcRef) -> bool) {
        self.launchers.retain(|_, watch| {
            watch.roots.retain(|root| !over(root));
            !watch.roots.is_empty()
        });
    }

    /// Takes a refused registration's processes back out of the kernel map: those the
    /// walk put there and, when the root was put there by it, whatever the kernel added
    /// below the root meanwhile (forked while it was watched; the tree does not know
    /// them yet, and their queued fork events find no analysis to join).
    fn roll_back(
        &mut self,
        root: ProcRef,
        root_is_new: bool,
        watched: &[ProcInfo],
        analysis_of: &dyn Fn(u32) -> Option<AnalysisKey>,
    ) {
        for info in watched {
            self.kernel.unwatch(info.proc_ref());
        }
        if !root_is_new {
            return;
        }
        loop {
            let Ok(below) = self.kernel.descendants(root) else {
                return;
            };
            let mut removed = 0;
            for record in below {
                let process = ProcRef::from(&record);
                if analysis_of(process.pid).is_none() && self.kernel.unwatch(process) {
                    removed += 1;
                }
            }
            if removed == 0 {
                return;
            }
        }
    }

    /// Hands a process the kernel map could not take back to it, with the descendants
    /// it forked meanwhile (the kernel did not see those forks).
    pub fn retrack(
        &mut self,
        process: ProcRef,
        key: AnalysisKey,
        mem_limit: RssLevels,
        analysis_of: &dyn Fn(u32) -> Option<AnalysisKey>,
    ) -> Retrack {
        match self.watch_verified(process, key, mem_limit) {
            Err(_) => return Retrack::NoRoom,
            Ok(false) => return Retrack::Gone,
            Ok(true) => {}
        }
        let mut found = Vec::new();
        // Members of an analysis already: no access check.
        let anyone = |_: ProcRef| Ok(());
        match self.watch_descendants(process, key, mem_limit, analysis_of, &anyone, &mut found) {
            Ok(()) => Retrack::Watched(found),
            Err(err) => {
                // All or nothing: the next attempt walks again.
                tracing::debug!(pid = process.pid, "retrack incomplete: {err:#}");
                self.kernel.unwatch(process);
                Retrack::NoRoom
            }
        }
    }

    /// Puts the living descendants of `root` in the kernel map, each once `permit`
    /// allows it, adding them to `watched` (which holds what was put there when an
    /// error stops the walk).
    fn watch_descendants(
        &mut self,
        root: ProcRef,
        key: AnalysisKey,
        mem_limit: RssLevels,
        analysis_of: &dyn Fn(u32) -> Option<AnalysisKey>,
        permit: &dyn Fn(ProcRef) -> Result<()>,
        watched: &mut Vec<ProcInfo>,
    ) -> Result<()> {
        let mut seen = HashSet::from([root.pid]);
        loop {
            let mut found = 0;
            for record in self.kernel.descendants(root)? {
                let pid = record.pid;
                if pid == self.self_pid || analysis_of(pid).is_some() || !seen.insert(pid) {
                    continue;
                }
                let info = ProcInfo {
                    pid,
                    ppid: record.ppid,
                    start_ns: record.start_ns,
                    comm: crate::vocab::process::Comm(record.comm)
                        .as_str()
                        .into_owned(),
                    kernel_thread: false,
                    exited: false,
                };
                permit(info.proc_ref())?;
                if self.watch_verified(info.proc_ref(), key, mem_limit)? {
                    watched.push(info);
                    found += 1;
                }
            }
            if found == 0 {
                return Ok(());
            }
        }
    }

    /// Puts a process in the kernel map, then checks it is still the same living
    /// process: if it exited (or its pid was recycled) in between, the kernel never
    /// saw that exit as watched, so the entry is taken back out.
    fn watch_verified(
        &mut self,
        process: ProcRef,
        key: AnalysisKey,
        mem_limit: RssLevels,
    ) -> Result<bool> {
        self.kernel.watch(process, key, mem_limit)?;
        let still_there = procs::read_same(process).is_some();
        if !still_there {
            self.kernel.unwatch(process);
        }
        Ok(still_there)
    }
}

/// A pidfd on `process` for a signal, unless it must never be signalled (init, the
/// daemon, a kernel thread: the last line of defence, whatever the rules say).
fn open_for_signal(process: ProcRef, self_pid: u32) -> Result<PidFd, OpenError> {
    let pid = process.pid;
    if pid <= 1 || pid == self_pid {
        tracing::error!(pid, "refusing to signal init or the daemon");
        return Err(OpenError::Gone);
    }
    PidFd::open_checked(process, |p: &ProcInfo| {
        if p.kernel_thread {
            tracing::error!(pid, "refusing to signal a kernel thread");
        }
        !p.kernel_thread
    })
}

/// One target's description, read before its first signal is sent (a dead process
/// has no cmdline) through `pidfd`, opened for a look that signals.
fn first_look(look: FirstLook, pidfd: Option<Result<PidFd, OpenError>>) -> Described {
    let (process, order, pidfd) = match (look, pidfd) {
        (FirstLook::Signal(order), Some(pidfd)) => (order.target, order, pidfd),
        (FirstLook::Signal(order), None) => (order.target, order, Err(OpenError::Gone)),
        (FirstLook::Describe(process), _) => {
            return Described {
                process,
                details: SysProcs.details(process),
                signal: None,
            };
        }
    };
    let (details, delivery) = match pidfd {
        Ok(pidfd) => {
            let details = SysProcs.details(process);
            match pidfd.signal(order.signal) {
                Ok(()) => (details, Delivery::Sent(pidfd)),
                Err(_) => (details, Delivery::NotSent),
            }
        }
        Err(OpenError::Gone) => (Details::default(), Delivery::NotSent),
        Err(OpenError::Failed(err)) => (SysProcs.details(process), Delivery::NoPidfd(err)),
    };
    Described {
        process,
        details,
        signal: Some((order, delivery)),
    }
}

impl Watch for Effects {
    /// Puts the launcher in the kernel's map of launchers, with the start time the
    /// kernel compares with its own (the /proc one is whole ticks: the kernel's is read
    /// back from its watched-map walk where it differs).
    fn launch(&mut self, registration: &Registration) -> Result<()> {
        let launcher = registration.root.proc_ref();
        self.kernel
            .launch(launcher, registration.key, registration.limits.rss_levels())?;
        if procs::read_same(launcher).is_none() {
            self.kernel.unlaunch(launcher);
            return Err(crate::vocab::error::Error::not_found(format!(
                "pid {} exited while its launch was being made",
                launcher.pid
            ))
            .into());
        }
        Ok(())
    }

    /// The living descendants of `root`, as the registration walk will find them,
    /// without putting anything in the kernel map: what the rules check before a
    /// registration by a caller confined to its own processes.
    fn descendants(&mut self, root: ProcRef) -> Result<Vec<ProcRef>> {
        Ok(self
            .kernel
            .descendants(root)?
            .into_iter()
            .map(|r| ProcRef::from(&r))
            .collect())
    }

    /// Puts a registration's processes in the kernel map: the root, then (unless it is
    /// `fresh`, started by `exec` and so childless) its descendants, found by the
    /// kernel's descendants iterator. Returns those verified to be the same living
    /// processes once in the map. A descendant that forks while this runs is caught
    /// either by the kernel (its parent is already in the map) or by the next pass,
    /// which runs until it finds nothing new. Each descendant found must pass `permit`
    /// (the rules' access check, done beforehand too, so this only catches one that
    /// changed hands meanwhile); when one does not, or the map refuses one, everything
    /// this put in the map is taken back out and the error returned: a refused
    /// registration leaves the kernel map as it was.
    fn watch(
        &mut self,
        registration: &Registration,
        fresh: bool,
        analysis_of: &dyn Fn(u32) -> Option<AnalysisKey>,
        permit: &dyn Fn(ProcRef) -> Result<()>,
    ) -> Result<Vec<ProcInfo>> {
        let key = registration.key;
        let mem_limit = registration.limits.rss_levels();
        let root = &registration.root;
        let mut watched = Vec::new();
        let root_is_new = analysis_of(root.pid).is_none();
        if root_is_new {
            if !self.watch_verified(root.proc_ref(), key, mem_limit)? {
                return Ok(watched);
            }
            watched.push(root.clone());
        }
        if !fresh
            && let Err(err) = self.watch_descendants(
                root.proc_ref(),
                key,
                mem_limit,
                analysis_of,
                permit,
                &mut watched,
            )
        {
            self.roll_back(root.proc_ref(), root_is_new, &watched, analysis_of);
            return Err(err);
        }
        Ok(watched)
    }
}
