//! `watchdog-user run`: one loop owns the tree and the kernel maps, and takes, in turn,
//! kernel event batches (from `ingest`), control requests (from `control`) and the loss
//! check. One owner means no locks and no interleaving to reason about.

use std::{
    collections::{HashSet, VecDeque},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, bail};
use tokio::{
    signal::unix::SignalKind,
    sync::{mpsc, oneshot},
};

use crate::{
    control::{self, Call, SocketGuard},
    enforce::RootRef,
    ingest::{self, KernelEvent},
    kernel::Kernel,
    kill::{KillJob, KillRecord},
    policy::{LimitOverrides, Limits},
    procs::{self, ProcInfo},
    protocol::{AnalysisView, Reply, Request, Response, Status, TreeNode},
    store::{self, DatabaseUrl, EventFilter, ProcessRow, StoreMsg},
    supervise,
    tree::{Analyses, AnalysisKey, Node, Tree},
};

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Milliseconds from now until `at`, negative when it has passed.
fn signed_ms_until(at: Instant) -> i64 {
    let now = Instant::now();
    match at.checked_duration_since(now) {
        Some(left) => i64::try_from(left.as_millis()).unwrap_or(i64::MAX),
        None => -i64::try_from(now.duration_since(at).as_millis()).unwrap_or(i64::MAX),
    }
}

/// How often the kernel's loss counters are read. A loss is repaired by a resync from
/// the kernel map, so this bounds how long the tree can be stale after a storm.
const LOSS_CHECK_EVERY: Duration = Duration::from_millis(200);
/// How often the `watchdog_processes` table is brought up to date (when changed).
const PROCESSES_SYNC_EVERY: Duration = Duration::from_millis(500);
/// Longest analysis id accepted: ids are labels, not payloads.
const MAX_ANALYSIS_ID: usize = 256;

pub struct Options {
    pub socket: PathBuf,
    pub btf: PathBuf,
    pub ring_bytes: Option<u32>,
    pub test_faults: bool,
    /// Limits for analyses that do not set their own.
    pub defaults: Limits,
    /// Reconcile poll: RSS of every watched process, and the safety net for the rest.
    pub poll_interval: Duration,
    /// Log every kill that would be made, signal nothing.
    pub dry_run: bool,
    /// The database, or why its URL was refused (the daemon then runs, spooling).
    pub database: Result<DatabaseUrl, String>,
    /// Where the spool (and other state) lives.
    pub state_dir: PathBuf,
    /// bpffs directory of the pinned maps and links.
    pub pin_dir: PathBuf,
    /// Drop pinned state first.
    pub fresh: bool,
    /// /status and /metrics listener.
    pub http: Option<std::net::SocketAddr>,
    /// What the options were resolved from, to resolve them again on SIGHUP.
    pub args: crate::config::RunArgs,
}

pub async fn run(options: Options) -> Result<()> {
    let listener = control::bind(&options.socket).await?;
    let _socket = SocketGuard(options.socket.clone());
    if let Some(bytes) = options.ring_bytes
        && (!bytes.is_power_of_two() || bytes < 4096)
    {
        bail!(
            "--ring-bytes {bytes} is not a power of two of at least 4096: the kernel requires one"
        );
    }
    let (kernel, ring) = Kernel::load(
        &options.btf,
        options.ring_bytes,
        &options.pin_dir,
        options.fresh,
    )?;
    let (event_tx, mut event_rx) = mpsc::channel(ingest::CHANNEL_BATCHES);
    let mut ingest_task = tokio::spawn(ingest::run(ring, event_tx));
    let (call_tx, mut call_rx) = mpsc::channel::<Call>(64);
    if let Some(addr) = options.http {
        tokio::spawn(crate::http::serve(
            crate::http::bind(addr).await?,
            call_tx.clone(),
        ));
    }
    tokio::spawn(control::serve(listener, call_tx));

    let (url, url_error) = match options.database.clone() {
        Ok(url) => (Some(url), None),
        Err(err) => {
            tracing::error!(
                "{err}: kill records are spooled until the daemon is restarted with a valid URL"
            );
            (None, Some(err))
        }
    };
    let store_tx = store::start(
        url,
        url_error,
        &options.state_dir.join("spool.jsonl"),
        crate::kill::hostname(),
    )?;
    let (parent_exit_tx, mut parent_exit_rx) = mpsc::unbounded_channel();
    let mut watchdog = Watchdog::new(kernel, &options, parent_exit_tx, store_tx);
    if watchdog.kernel.resumed() {
        watchdog.resume();
    } else {
        watchdog.resync("start");
    }
    tracing::info!(
        socket = %options.socket.display(),
        watched = watchdog.tree.len(),
        "watchdog ready: programs attached"
    );
    supervise::ready(&watchdog.status_line());
    let heartbeat_every = supervise::heartbeat_every();
    let mut heartbeat = tokio::time::interval(heartbeat_every.unwrap_or(Duration::from_secs(3600)));

    let mut loss_check = tokio::time::interval(LOSS_CHECK_EVERY);
    let mut processes_sync = tokio::time::interval(PROCESSES_SYNC_EVERY);
    let mut poll = tokio::time::interval(options.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            Some(batch) = event_rx.recv() => {
                for event in batch {
                    watchdog.apply(event);
                }
            }
            Some((request, reply)) = call_rx.recv() => match request {
                Request::Stall { ms } if options.test_faults => {
                    let _ = reply.send(Response::Ok(Reply::Stalling { ms }));
                    tracing::warn!(ms, "test fault: main loop stalled");
                    std::thread::sleep(Duration::from_millis(ms));
                }
                Request::Events { filter } => watchdog.answer_events(filter, reply),
                Request::Status => watchdog.answer_status(reply),
                request => {
                    let _ = reply.send(watchdog.handle(request));
                }
            },
            _ = processes_sync.tick() => watchdog.sync_processes(),
            _ = heartbeat.tick(), if heartbeat_every.is_some() => supervise::heartbeat(&watchdog.status_line()),
            _ = loss_check.tick() => watchdog.repair_losses(),
            _ = poll.tick() => watchdog.reconcile(),
            Some(root) = parent_exit_rx.recv() => watchdog.root_parent_died(root),
            _ = sleep_until_next(watchdog.next_wakeup()) => watchdog.on_timers(),
            ended = &mut ingest_task => {
                bail!("the ring buffer reader stopped: {:?}", ended.map(|r| r.map_err(|e| format!("{e:#}"))));
            }
            _ = sighup.recv() => {
                if let Some(every) = watchdog.reload(&options) {
                    poll = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    supervise::stopping();
    tracing::info!("watchdog stopping");
    Ok(())
}

/// Sleeps until `at`, or forever when nothing is scheduled.
async fn sleep_until_next(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    forks: u64,
    exits: u64,
    execs: u64,
    resyncs: u64,
    /// Kernel loss counters as of the last resync.
    pub(crate) losses_repaired: u64,
    pub(crate) rss_reports: u64,
    /// How long the last reconcile poll took, µs.
    pub(crate) last_poll_us: u64,
    /// Processes recorded as killed (or would-be killed in a dry run).
    pub(crate) kills: u64,
    /// CLOCK_BOOTTIME of the last resync: fork events from before it are checked
    /// against the kernel map, since their exits may have been lost.
    resynced_at_ns: u64,
}

pub(crate) struct Watchdog {
    pub(crate) kernel: Kernel,
    pub(crate) tree: Tree,
    pub(crate) analyses: Analyses,
    pub(crate) counters: Counters,
    started: Instant,
    pub(crate) self_pid: u32,
    pub(crate) defaults: Limits,
    pub(crate) dry_run: bool,
    poll_interval: Duration,
    pub(crate) host: String,
    /// Kills in progress, and when they are next looked at.
    pub(crate) jobs: Vec<KillJob>,
    pub(crate) kill_tick_at: Instant,
    /// Finished violations and kills, newest last (bounded).
    pub(crate) records: VecDeque<KillRecord>,
    /// Where the watchers of registered roots' parents report a parent's death.
    pub(crate) parent_exit_tx: mpsc::UnboundedSender<RootRef>,
    /// The database writer: records and process rows go there, never waited on.
    pub(crate) store: mpsc::UnboundedSender<StoreMsg>,
    /// The tree changed since `watchdog_processes` was last brought up to date.
    pub(crate) processes_dirty: bool,
}

impl Watchdog {
    fn new(
        kernel: Kernel,
        options: &Options,
        parent_exit_tx: mpsc::UnboundedSender<RootRef>,
        store: mpsc::UnboundedSender<StoreMsg>,
    ) -> Self {
        Self {
            kernel,
            tree: Tree::default(),
            analyses: Analyses::default(),
            counters: Counters::default(),
            started: Instant::now(),
            self_pid: std::process::id(),
            defaults: options.defaults.clone(),
            dry_run: options.dry_run,
            poll_interval: options.poll_interval,
            host: crate::kill::hostname(),
            jobs: Vec::new(),
            kill_tick_at: Instant::now(),
            records: VecDeque::new(),
            parent_exit_tx,
            store,
            processes_dirty: true,
        }
    }

    /// SIGHUP: re-reads the settings; applies what can change while running (limits
    /// for new analyses, poll interval, dry run) and returns the new poll interval.
    /// A file that does not parse changes nothing.
    fn reload(&mut self, running: &Options) -> Option<Duration> {
        let new = match running.args.resolve() {
            Ok(new) => new,
            Err(err) => {
                tracing::error!("{err:#}: keeping the running settings");
                return None;
            }
        };
        let needs_restart = new.socket != running.socket
            || new.state_dir != running.state_dir
            || new.pin_dir != running.pin_dir
            || new.http != running.http
            || new.database.as_ref().map(|u| &u.url) != running.database.as_ref().map(|u| &u.url);
        if needs_restart {
            tracing::warn!(
                "socket, database, state, pin and http settings change only with a restart"
            );
        }
        self.defaults = new.defaults.clone();
        self.dry_run = new.dry_run;
        self.poll_interval = new.poll_interval;
        tracing::info!(defaults = ?self.defaults, dry_run = self.dry_run, poll = ?self.poll_interval, "settings reloaded");
        Some(new.poll_interval)
    }

    fn kills_by_reason(&self) -> std::collections::BTreeMap<String, u64> {
        let mut by_reason: std::collections::BTreeMap<String, u64> =
            ["timeout", "memory", "tree_memory", "orphan"]
                .iter()
                .map(|r| (r.to_string(), 0))
                .collect();
        for record in &self.records {
            *by_reason
                .entry(record.reason.as_str().to_string())
                .or_default() += 1;
        }
        by_reason
    }

    /// One line for systemd's STATUS=.
    fn status_line(&self) -> String {
        format!(
            "watching {} processes in {} analyses; {} kills; {} lost events",
            self.tree.len(),
            self.analyses.len(),
            self.counters.kills,
            self.kernel.lost_events()
        )
    }

    fn answer_events(&self, filter: EventFilter, reply: oneshot::Sender<Response>) {
        let (tx, rx) = oneshot::channel();
        let _ = self.store.send(StoreMsg::Query(filter, tx));
        tokio::spawn(async move {
            let response = match rx.await {
                Ok(Ok(records)) => Response::Ok(Reply::Events { records }),
                Ok(Err(err)) => Response::Error(err),
                Err(_) => Response::Error("the database writer stopped".into()),
            };
            let _ = reply.send(response);
        });
    }

    fn answer_status(&self, reply: oneshot::Sender<Response>) {
        let mut status = self.status();
        let (tx, rx) = oneshot::channel();
        let _ = self.store.send(StoreMsg::Status(tx));
        tokio::spawn(async move {
            status.database = rx.await.unwrap_or_default();
            status.db = status.database.state.clone();
            let _ = reply.send(Response::Ok(Reply::Status(status)));
        });
    }

    /// Sends what is watched now to the database writer, when it changed.
    pub(crate) fn sync_processes(&mut self) {
        if !std::mem::take(&mut self.processes_dirty) {
            return;
        }
        let now_wall = SystemTime::now();
        let now_boot = procs::boottime_ns();
        let rows = self
            .tree
            .pids()
            .into_iter()
            .filter_map(|pid| {
                let node = self.tree.get(pid)?;
                let analysis = self.analyses.get(node.analysis)?;
                let started =
                    now_wall - Duration::from_nanos(now_boot.saturating_sub(node.start_ns));
                let state = if self.jobs.iter().any(|j| j.target_pending(pid)) {
                    "grace"
                } else if node.orphan {
                    "orphan"
                } else {
                    "running"
                };
                Some(ProcessRow {
                    pid,
                    ppid: node.ppid,
                    start_time: rfc3339(started),
                    analysis_id: analysis.id.clone(),
                    timeout_ms: analysis.limits.timeout_ms,
                    memory_bytes: analysis.limits.memory_bytes,
                    tree_memory_bytes: analysis.limits.tree_memory_bytes,
                    grace_ms: analysis.limits.grace_ms,
                    orphans: format!("{:?}", analysis.limits.orphans).to_lowercase(),
                    registered_at: rfc3339(analysis.registered_wall),
                    state: state.into(),
                })
            })
            .collect();
        let _ = self.store.send(StoreMsg::Processes(rows));
    }

    fn apply(&mut self, event: KernelEvent) {
        if !matches!(event, KernelEvent::Rss { .. }) {
            self.processes_dirty = true;
        }
        match event {
            KernelEvent::Fork {
                pid,
                ppid,
                analysis,
                start_ns,
                comm,
                ts_ns,
            } => {
                self.counters.forks += 1;
                tracing::trace!(pid, ppid, comm, "fork");
                if self.analyses.id(analysis).is_none() {
                    // Forked while its analysis was being unregistered.
                    self.kernel.unwatch(pid);
                    return;
                }
                if ts_ns <= self.counters.resynced_at_ns && !self.kernel.is_watched(pid) {
                    // Queued before a resync: its exit event may be among the lost ones,
                    // and the kernel map says it is gone.
                    return;
                }
                self.tree
                    .insert_forked(Node::new(pid, ppid, start_ns, comm, analysis));
                self.join_dying_scope(pid, ppid, analysis);
            }
            KernelEvent::Exit {
                pid,
                analysis,
                start_ns,
                exit_status,
            } => {
                self.counters.exits += 1;
                let same_process = self
                    .tree
                    .get(pid)
                    .is_some_and(|n| procs::same_start(n.start_ns, start_ns));
                if same_process {
                    let children = self
                        .tree
                        .get(pid)
                        .map(|n| n.children.clone())
                        .unwrap_or_default();
                    self.tree.remove(pid);
                    tracing::debug!(pid, exit_status, "watched process exited");
                    for child in children {
                        self.orphaned(child);
                    }
                }
                self.forget_if_finished(analysis);
            }
            KernelEvent::Rss {
                pid,
                analysis,
                rss_bytes,
            } => {
                self.counters.rss_reports += 1;
                self.rss_reported(pid, analysis, rss_bytes);
            }
            KernelEvent::Exec { pid, comm } => {
                self.counters.execs += 1;
                if let Some(node) = self.tree.get_mut(pid) {
                    node.comm = comm;
                }
            }
        }
    }

    pub(crate) fn forget_if_finished(&mut self, analysis: AnalysisKey) {
        if !self.tree.has_analysis(analysis) {
            self.analyses.forget(analysis);
            self.kernel.forget_analysis(analysis);
        }
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Register {
                pid,
                analysis_id,
                limits,
            } => {
                self.processes_dirty = true;
                self.register(pid, &analysis_id, &limits)
            }
            // The loop answers these through the store; never a panic in the daemon.
            Request::Events { .. } | Request::Status => Err(anyhow::anyhow!(
                "internal: this request is answered by the daemon loop"
            )),
            Request::Unregister { pid, analysis_id } => {
                self.processes_dirty = true;
                self.unregister(pid, analysis_id.as_deref())
            }
            Request::DumpTree { analysis_id } => self.dump_tree(analysis_id.as_deref()),
            Request::Stall { .. } => Err(anyhow::anyhow!(
                "stall is a test-only fault: start the daemon with --test-faults to use it"
            )),
        };
        match result {
            Ok(reply) => Response::Ok(reply),
            Err(err) => Response::Error(format!("{err:#}")),
        }
    }

    /// Checks everything before touching anything, so a refused request changes nothing.
    fn check_registrable(&self, pid: u32, analysis_id: &str) -> Result<ProcInfo> {
        if analysis_id.trim().is_empty() {
            bail!("the analysis id is empty: pass --analysis-id with a name for the analysis");
        }
        if analysis_id.len() > MAX_ANALYSIS_ID {
            bail!(
                "the analysis id is {} bytes long: use at most {MAX_ANALYSIS_ID}",
                analysis_id.len()
            );
        }
        if pid == 0 || pid == 1 {
            bail!(
                "refusing to watch pid {pid}: it is the system's init/idle task, which the watchdog never touches"
            );
        }
        if pid == self.self_pid {
            bail!("refusing to watch pid {pid}: it is the watchdog daemon itself");
        }
        let Some(info) = procs::read(pid) else {
            bail!("no process with pid {pid}: check the pid (the process may have exited)");
        };
        if info.kernel_thread {
            bail!(
                "pid {pid} ({}) is a kernel thread: only user processes can be watched",
                info.comm
            );
        }
        if let Some(node) = self.tree.get(pid) {
            let current = self.analyses.id(node.analysis).unwrap_or("?");
            if current != analysis_id {
                bail!(
                    "pid {pid} is already watched as part of analysis {current:?}: unregister it first"
                );
            }
        }
        Ok(info)
    }

    fn register(
        &mut self,
        pid: u32,
        analysis_id: &str,
        overrides: &LimitOverrides,
    ) -> Result<Reply> {
        let info = self.check_registrable(pid, analysis_id)?;
        let limits = self
            .defaults
            .with(overrides)
            .map_err(|e| anyhow::anyhow!("{e}: nothing was registered"))?;
        let new_analysis = self.analyses.key(analysis_id).is_none();
        let key = self.analyses.key_for(analysis_id, &limits);
        if new_analysis {
            let entry =
                crate::enforce::entry_from_analysis(self.analyses.get(key).expect("just made"));
            self.kernel.save_analysis(key, &entry)?;
        }
        if !self.tree.contains(pid) && !self.watch_verified(&info, key)? {
            self.forget_if_finished(key);
            bail!("pid {pid} exited while it was being registered");
        }
        self.adopt_descendants(key)?;
        self.save_root(&info, key)?;
        self.watch_root_parent(&info);
        let watched = self.tree.pids_of(key).len();
        tracing::info!(pid, analysis_id, watched, "registered");
        Ok(Reply::Registered {
            pid,
            analysis_id: analysis_id.to_string(),
            watched,
        })
    }

    /// Remembers the root and its launcher in the kernel map, for a restarted daemon.
    fn save_root(&mut self, root: &ProcInfo, key: AnalysisKey) -> Result<()> {
        let parent_start_ns = procs::read(root.ppid).map_or(0, |p| p.start_ns);
        let entry = watchdog_common::RootEntry {
            analysis: key,
            start_ns: root.start_ns,
            parent_start_ns,
            parent_pid: root.ppid,
            _pad: 0,
        };
        self.kernel.save_root(root.pid, &entry)
    }

    /// Puts a process found in /proc into the kernel map, then checks it is still the
    /// same living process: if it exited (or its pid was recycled) in between, the
    /// kernel never saw that exit as watched, so the entry is taken back out.
    fn watch_verified(&mut self, info: &ProcInfo, key: AnalysisKey) -> Result<bool> {
        let mem_limit = self.analyses.get(key).map_or(0, |a| a.limits.memory_bytes);
        self.kernel.watch(info.pid, key, mem_limit)?;
        let still_there =
            procs::read(info.pid).is_some_and(|now| procs::same_start(now.start_ns, info.start_ns));
        if !still_there {
            self.kernel.unwatch(info.pid);
            return Ok(false);
        }
        self.tree.insert(Node::new(
            info.pid,
            info.ppid,
            info.start_ns,
            info.comm.clone(),
            key,
        ));
        Ok(true)
    }

    /// Watches the descendants that existed before registration. New forks are the
    /// kernel's job from the moment a parent is in the map; this catches the ones
    /// forked earlier, repeating until a scan finds nothing new (a child forked by a
    /// not-yet-watched parent during a scan shows up in the next one).
    fn adopt_descendants(&mut self, key: AnalysisKey) -> Result<()> {
        loop {
            let mut found = 0;
            for info in procs::all() {
                let parent_in_analysis =
                    self.tree.get(info.ppid).is_some_and(|p| p.analysis == key);
                if parent_in_analysis
                    && !self.tree.contains(info.pid)
                    && info.pid != self.self_pid
                    && !info.kernel_thread
                    && self.watch_verified(&info, key)?
                {
                    found += 1;
                }
            }
            if found == 0 {
                return Ok(());
            }
        }
    }

    fn unregister(&mut self, pid: Option<u32>, analysis_id: Option<&str>) -> Result<Reply> {
        let pids = match (pid, analysis_id) {
            (Some(pid), None) => {
                if !self.tree.contains(pid) {
                    bail!("pid {pid} is not watched: see `watchdog-user dump-tree`");
                }
                self.tree.subtree(pid)
            }
            (None, Some(id)) => {
                let Some(key) = self.analyses.key(id) else {
                    bail!("no analysis {id:?} is watched: see `watchdog-user dump-tree`");
                };
                self.tree.pids_of(key)
            }
            _ => bail!("unregister takes exactly one of --pid or --analysis-id"),
        };
        let mut analyses = HashSet::new();
        for &pid in &pids {
            self.kernel.unwatch(pid);
            if let Some(node) = self.tree.remove(pid) {
                analyses.insert(node.analysis);
            }
        }
        for key in analyses {
            self.forget_if_finished(key);
        }
        tracing::info!(?pid, ?analysis_id, removed = pids.len(), "unregistered");
        Ok(Reply::Unregistered {
            removed: pids.len(),
        })
    }

    fn dump_tree(&self, analysis_id: Option<&str>) -> Result<Reply> {
        let filter = match analysis_id {
            Some(id) => match self.analyses.key(id) {
                Some(key) => Some(key),
                None => {
                    return Ok(Reply::Tree {
                        roots: Vec::new(),
                        analyses: Vec::new(),
                    });
                }
            },
            None => None,
        };
        let now = procs::boottime_ns();
        let roots = self
            .tree
            .roots()
            .into_iter()
            .filter(|n| filter.is_none_or(|key| n.analysis == key))
            .map(|n| self.view(n, now))
            .collect();
        let analyses = self
            .analyses
            .iter()
            .filter(|(key, _)| filter.is_none_or(|f| f == *key))
            .map(|(key, a)| AnalysisView {
                analysis_id: a.id.clone(),
                processes: self.tree.pids_of(key).len(),
                deadline_in_ms: signed_ms_until(a.deadline),
                deadline_unix_ms: a
                    .deadline_wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, crate::policy::millis),
                limits: a.limits.clone(),
            })
            .collect();
        Ok(Reply::Tree { roots, analyses })
    }

    fn view(&self, node: &Node, now_ns: u64) -> TreeNode {
        TreeNode {
            pid: node.pid,
            ppid: node.ppid,
            analysis_id: self
                .analyses
                .id(node.analysis)
                .unwrap_or_default()
                .to_string(),
            comm: node.comm.clone(),
            age_ms: now_ns.saturating_sub(node.start_ns) / 1_000_000,
            rss_bytes: procs::rss_bytes(node.pid),
            orphan: node.orphan,
            grace_left_ms: self
                .jobs
                .iter()
                .find(|j| j.target_pending(node.pid))
                .and_then(KillJob::grace_left_ms),
            children: node
                .children
                .iter()
                .filter_map(|c| self.tree.get(*c))
                .map(|c| self.view(c, now_ns))
                .collect(),
        }
    }

    fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            monitored_count: self.tree.len(),
            analyses: self.analyses.len(),
            forks_seen: self.counters.forks,
            exits_seen: self.counters.exits,
            execs_seen: self.counters.execs,
            lost_events: self.kernel.lost_events(),
            watch_map_full: self.kernel.watch_map_full(),
            resyncs: self.counters.resyncs,
            rss_reports: self.counters.rss_reports,
            last_poll_ms: self.counters.last_poll_us as f64 / 1000.0,
            grace_count: self
                .tree
                .pids()
                .into_iter()
                .filter(|p| self.jobs.iter().any(|j| j.target_pending(*p)))
                .count(),
            kills_total: self.counters.kills,
            kills_by_reason: self.kills_by_reason(),
            kills_last_24h: {
                let day_ago = humantime::format_rfc3339_millis(
                    SystemTime::now() - Duration::from_secs(86_400),
                )
                .to_string();
                self.records.iter().filter(|r| r.time >= day_ago).count()
            },
            recent_events: self.records.iter().rev().take(20).cloned().collect(),
            dry_run: self.dry_run,
            db: String::new(),
            database: Default::default(),
            settings: crate::config::Runtime {
                defaults: Some(self.defaults.clone()),
                poll_interval_ms: crate::policy::millis(self.poll_interval),
                dry_run: self.dry_run,
            },
        }
    }

    /// When the kernel counted lost events (ring full) or children it could not watch
    /// (map full) since the last look, the tree may be wrong: rebuild it.
    fn repair_losses(&mut self) {
        let losses = self.kernel.lost_events() + self.kernel.watch_map_full();
        if losses != self.counters.losses_repaired {
            tracing::warn!(
                lost = losses - self.counters.losses_repaired,
                "kernel events were lost: resyncing the tree from the kernel map and /proc"
            );
            self.counters.losses_repaired = losses;
            self.counters.resyncs += 1;
            self.resync("lost events");
        }
    }

    /// Rebuilds the tree from the kernel's map (which the programs keep exact even when
    /// events are lost) and /proc (for parentage and names).
    pub(crate) fn resync(&mut self, reason: &str) {
        self.counters.resynced_at_ns = procs::boottime_ns();
        let watched = self.kernel.watched();
        let in_map: HashSet<u32> = watched.iter().map(|(pid, _)| *pid).collect();
        for pid in self.tree.pids() {
            if !in_map.contains(&pid) {
                self.tree.remove(pid);
            }
        }
        for (pid, key) in watched {
            if self.analyses.id(key).is_none() {
                self.kernel.unwatch(pid);
                continue;
            }
            if self.tree.contains(pid) {
                continue;
            }
            match procs::read(pid) {
                Some(info) => {
                    self.tree
                        .insert(Node::new(pid, info.ppid, info.start_ns, info.comm, key))
                }
                None => {
                    self.kernel.unwatch(pid);
                }
            }
        }
        tracing::info!(reason, watched = self.tree.len(), "tree resynced");
    }
}
