//! `watchdog-user run`: the wiring. One loop takes, in turn, kernel event batches
//! (`kernel::ingest`), requests (`api::control`, `api::http`, routed by
//! `api::requests::route`), poll results, launcher exits, kill targets described off
//! the loop and the clock, feeds them to the rules core (`core`), and hands the actions
//! it returns to `app::effects`. The loop holds no rule of its own; one owner of the
//! state means no locks and no interleaving to reason about. Every task it starts is
//! supervised (`os::tasks`):
//! one that ends stops the daemon (systemd restarts it), after what the store holds has
//! been spooled.

use std::{
    path::Path,
    time::{Duration, Instant},
};
use watchdog_common::KillProgress;

use anyhow::{Result, bail};
use tokio::{
    signal::unix::SignalKind,
    sync::{mpsc, oneshot},
};

use crate::{
    api::{
        access,
        control::{self, Call, SocketGuard},
        overview::{self, RssHistory},
        protocol::{Faults, Reply, Response, TestFault},
        report::{self, KernelCounters},
        requests::{self, Routed},
    },
    app::effects::{Described, Effects, Feedback},
    core::event::KernelEvent,
    core::{Clock, Core, Resync, Saved, Settings},
    kernel::{self, Kernel, ingest},
    os::{
        private,
        procs::{self, SysProcs},
        supervise,
        tasks::{self, Tasks},
    },
    store::{self, EventFilter, StoreMsg},
    vocab::{error::ErrorKind, process::ProcRef},
};

/// How often the kernel's loss counters are read. A loss is repaired by a resync from
/// the kernel map, so this bounds how long the tree can be stale after a storm.
const LOSS_CHECK_EVERY: Duration = Duration::from_millis(200);
/// How often the `watchdog_processes` table is brought up to date (when changed).
const PROCESSES_SYNC_EVERY: Duration = Duration::from_millis(500);
/// The bearer token the HTTP listener asks for, in the state directory.
pub const HTTP_TOKEN_FILE: &str = "http-token";
/// How long the shutdown waits for the store's front task to take what is queued.
const STORE_FINISH_WITHIN: Duration = Duration::from_secs(5);

pub async fn run(options: crate::app::config::Options) -> Result<()> {
    private::restrict_umask();
    let (listener, staged) = control::bind(&options.socket).await?;
    let _socket = SocketGuard(vec![staged.clone(), options.socket.clone()]);
    let (mut kernel, ring) = load_kernel(&options)?;
    // After the programs load: a daemon that cannot load them says only that.
    if let Some(tightened) = private::own_dir(&options.state_dir)? {
        tracing::warn!("{tightened}");
    }
    share_socket(&staged, &options.socket, &options.socket_group);
    control::publish(&staged, &options.socket)?;
    // Every task the daemon starts is supervised: one that ends stops the daemon.
    let mut tasks = Tasks::new();
    if let Some(logger) = kernel.take_logger() {
        tasks.spawn("kernel log forwarder", kernel::forward_kernel_log(logger));
    }
    let (event_tx, event_rx) = mpsc::channel(ingest::CHANNEL_BATCHES);
    let (drain_tx, drain_rx) = mpsc::unbounded_channel();
    tasks.spawn("ring buffer reader", ingest::run(ring, event_tx, drain_rx));
    let call_rx = serve_requests(&options, listener, &mut tasks).await?;
    let host = crate::os::host::hostname();
    let (store_tx, store) = start_store(&options, host.clone(), &mut tasks)?;
    let (launcher_tx, launcher_rx) = mpsc::unbounded_channel();
    let (poll_tx, poll_rx) = mpsc::unbounded_channel();
    let (drained_tx, drained_rx) = mpsc::unbounded_channel();
    let (described_tx, described_rx) = mpsc::unbounded_channel();
    let mut daemon = Daemon {
        core: Core::new(
            settings_of(&options, read_machine_memory(), &kernel),
            host,
            std::process::id(),
        ),
        effects: Effects::new(kernel, store_tx, launcher_tx, described_tx),
        started: Instant::now(),
        poll_interval: options.poll_interval,
        losses_repaired: 0,
        refusals_open: true,
        last_poll_us: 0,
        polling: false,
        poll_tx,
        loop_longest: Duration::ZERO,
        history: RssHistory::default(),
        drain: (drain_tx, drained_tx),
        waiters: Vec::new(),
    };
    daemon.start();
    announce_ready(&daemon, &options.socket);
    let mut inputs = Inputs {
        events: event_rx,
        drained: drained_rx,
        calls: call_rx,
        polls: poll_rx,
        launchers: launcher_rx,
        described: described_rx,
        timers: Timers::new(options.poll_interval)?,
    };
    let ended = loop {
        let input = match inputs.next(&daemon, &mut tasks).await {
            Ok(input) => input,
            Err(ended) => break ended,
        };
        // Handled and timed, so the loop's longest stall is known (status, /metrics)
        // rather than guessed.
        let began = Instant::now();
        daemon.on_input(input, &mut inputs, &options);
        daemon.loop_longest = daemon.loop_longest.max(began.elapsed());
    };
    shut_down(daemon, tasks, store).await;
    match ended {
        Some(ended) => Err(ended.into()),
        None => Ok(()),
    }
}

/// The programs loaded and attached (or resumed), with what they may do themselves set
/// from the options.
fn load_kernel(
    options: &crate::app::config::Options,
) -> Result<(Kernel, aya::maps::RingBuf<aya::maps::MapData>)> {
    check_ring_bytes(options.ring_bytes)?;
    let (mut kernel, ring) = Kernel::load(
        &options.btf,
        options.ring_bytes,
        options.watched_capacity,
        &options.pin_dir,
        options.fresh,
        options.kernel_log,
    )?;
    kernel.set_memory_strike(options.memory_strike_off())?;
    kernel.set_fork_refusal(options.fork_refusal_off())?;
    Ok((kernel, ring))
}

/// The one "ready" line (and what priority the daemon could not take), then READY=1.
fn announce_ready(daemon: &Daemon, socket: &Path) {
    tracing::info!(
        socket = %socket.display(),
        watched = daemon.core.tree().len(),
        "watchdog ready: programs attached"
    );
    for line in crate::os::host::not_outranked() {
        tracing::warn!("{line}");
    }
    supervise::ready(&daemon.status_line());
}

fn check_ring_bytes(ring_bytes: Option<u32>) -> Result<()> {
    if let Some(bytes) = ring_bytes
        && (!bytes.is_power_of_two() || bytes < 4096)
    {
        bail!(
            "--ring-bytes {bytes} is not a power of two of at least 4096: the kernel requires one"
        );
    }
    Ok(())
}

/// Once the programs are loaded (a daemon that cannot start says only why), the staged
/// socket is given its group; it is published at `socket` only after that.
fn share_socket(staged: &Path, socket: &Path, group: &str) {
    match access::share_socket(staged, socket, group) {
        Ok(gid) => tracing::info!(
            socket = %socket.display(),
            group,
            gid,
            "the socket is open to root and the socket group (mode 0660)"
        ),
        Err(warning) => tracing::warn!("{warning}"),
    }
}

/// The control socket's server and the HTTP listener, both handing their calls to the
/// loop through the returned channel.
async fn serve_requests(
    options: &crate::app::config::Options,
    listener: tokio::net::UnixListener,
    tasks: &mut Tasks,
) -> Result<mpsc::Receiver<Call>> {
    let (call_tx, call_rx) = mpsc::channel::<Call>(64);
    if let Some(addr) = options.http {
        let listener = crate::api::http::bind(addr).await?;
        let token_file = options.state_dir.join(HTTP_TOKEN_FILE);
        let token = private::http_token(&token_file)?;
        let access = crate::api::http::TokenCheck::new(token, token_file);
        tasks.spawn(
            "HTTP server",
            crate::api::http::serve(listener, call_tx.clone(), access),
        );
    }
    tasks.spawn("control socket server", async move {
        control::serve(listener, call_tx).await;
        Ok(())
    });
    Ok(call_rx)
}

/// The store's tasks, over the database when its URL is valid (else spooling only).
fn start_store(
    options: &crate::app::config::Options,
    host: String,
    tasks: &mut Tasks,
) -> Result<(mpsc::UnboundedSender<StoreMsg>, store::StoreHandle)> {
    let (url, url_error) = match options.database.clone() {
        Ok(url) => (Some(url), None),
        Err(err) => {
            tracing::error!(
                "{err}: kill records are spooled until the daemon is restarted with a valid URL"
            );
            (None, Some(err))
        }
    };
    store::start(
        url,
        url_error,
        &options.state_dir.join("spool.jsonl"),
        host,
        tasks,
    )
}

/// The rules' settings from the options, for a machine of `machine_memory` (read once,
/// at start, and kept on reload).
fn settings_of(
    options: &crate::app::config::Options,
    machine_memory: Option<u64>,
    kernel: &Kernel,
) -> Settings {
    let settings = Settings {
        defaults: options.defaults.clone(),
        dry_run: options.dry_run,
        remove_shm: options.remove_shm,
        machine_memory,
        admin_gid: admin_gid(options.admin_group.as_deref()),
        memory_metric: options.memory_metric,
        quotas: options.quotas,
        kernel_refuses_forks: kernel.refuses_forks(),
    };
    if let Some(warning) = settings.unreachable_default() {
        tracing::warn!("{warning}");
    }
    settings
}

/// Closing the store's inbox lets its front task spool what is queued and end; then
/// whatever is still held (also by a store task that died, and the records the loop
/// could not hand over) is spooled here.
async fn shut_down(mut daemon: Daemon, mut tasks: Tasks, store: store::StoreHandle) {
    supervise::stopping();
    tracing::info!("watchdog stopping");
    let unqueued = daemon.effects.take_unqueued();
    drop(daemon);
    if !tasks.finish(store::FRONT_TASK, STORE_FINISH_WITHIN).await {
        tracing::warn!(
            "the {} task did not end within {STORE_FINISH_WITHIN:?}: spooling what it holds \
             without it",
            store::FRONT_TASK
        );
    }
    store.last_flush(unqueued);
}

/// Where the loop's inputs come from: the channels of the tasks beside it, and its
/// timers and signals.
struct Inputs {
    events: mpsc::Receiver<ingest::Batch>,
    drained: mpsc::UnboundedReceiver<AfterDrain>,
    calls: mpsc::Receiver<Call>,
    polls: mpsc::UnboundedReceiver<(PollSamples, Instant)>,
    launchers: mpsc::UnboundedReceiver<ProcRef>,
    described: mpsc::UnboundedReceiver<Vec<Described>>,
    timers: Timers,
}

/// The loop's own timers and the signals it obeys.
struct Timers {
    heartbeat_every: Option<Duration>,
    heartbeat: tokio::time::Interval,
    loss_check: tokio::time::Interval,
    processes_sync: tokio::time::Interval,
    poll: tokio::time::Interval,
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
}

impl Timers {
    fn new(poll_every: Duration) -> Result<Self> {
        let heartbeat_every = supervise::heartbeat_every();
        let mut poll = tokio::time::interval(poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            heartbeat_every,
            heartbeat: tokio::time::interval(heartbeat_every.unwrap_or(Duration::from_secs(3600))),
            loss_check: tokio::time::interval(LOSS_CHECK_EVERY),
            processes_sync: tokio::time::interval(PROCESSES_SYNC_EVERY),
            poll,
            sigterm: tokio::signal::unix::signal(SignalKind::terminate())?,
            sigint: tokio::signal::unix::signal(SignalKind::interrupt())?,
            sighup: tokio::signal::unix::signal(SignalKind::hangup())?,
        })
    }
}

impl Inputs {
    /// The next input, typed; Err when the loop must end (a task ended: Some, or
    /// SIGTERM/SIGINT: None).
    async fn next(
        &mut self,
        daemon: &Daemon,
        tasks: &mut Tasks,
    ) -> Result<Input, Option<tasks::Ended>> {
        Ok(tokio::select! {
            Some(batch) = self.events.recv() => Input::Events(batch),
            Some(waiting) = self.drained.recv() => Input::Drained(waiting),
            Some(call) = self.calls.recv() => Input::Call(call),
            _ = self.timers.processes_sync.tick() => Input::SyncProcesses,
            _ = self.timers.heartbeat.tick(), if self.timers.heartbeat_every.is_some() => Input::Heartbeat,
            _ = self.timers.loss_check.tick() => Input::LossCheck,
            _ = self.timers.poll.tick() => Input::Poll,
            Some(samples) = self.polls.recv() => Input::PollDone(samples),
            Some(root) = self.launchers.recv() => Input::LauncherExit(root),
            Some(batch) = self.described.recv() => Input::Described(batch),
            _ = tasks::sleep_until(daemon.core.next_wakeup()) => Input::Tick,
            ended = tasks.ended() => {
                tracing::error!(
                    "{ended}: stopping, so that the daemon is restarted (the pinned kernel \
                     programs keep tracking meanwhile)"
                );
                return Err(Some(ended));
            }
            _ = self.timers.sighup.recv() => Input::Reload,
            _ = self.timers.sigterm.recv() => return Err(None),
            _ = self.timers.sigint.recv() => return Err(None),
        })
    }

    /// The poll's timer, restarted at a new interval.
    fn repoll_every(&mut self, every: Duration) {
        self.timers.poll = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    }
}

/// The gid of `--admin-group`, said in one line when there is no such group (then only
/// root may do everything).
fn admin_gid(group: Option<&str>) -> Option<u32> {
    let group = group?;
    let gid = access::group_gid(group);
    match gid {
        Some(gid) => tracing::info!(group, gid, "members of the admin group may do everything"),
        None => tracing::warn!(
            "the admin group {group:?} does not exist: only root may watch or unregister \
             other users' processes; create it (`groupadd {group}`) and reload, or fix \
             --admin-group"
        ),
    }
    gid
}

/// The machine's total memory, once, at start (sysinfo reads /proc/meminfo).
fn read_machine_memory() -> Option<u64> {
    let started = Instant::now();
    let total = crate::os::host::machine_memory();
    let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    match total {
        Some(bytes) => tracing::debug!(bytes, took_us, "machine memory read (sysinfo)"),
        None => tracing::warn!(
            "the machine's total memory could not be read: memory limits are not checked against it"
        ),
    }
    total
}

/// (process, RSS) of watched processes, read off the loop.
/// What one poll read: the RSS of every watched process, and the tmpfs files of those
/// holding any.
struct PollSamples {
    rss: Vec<(ProcRef, u64)>,
    held: Vec<(ProcRef, crate::core::procs::Held)>,
}

impl PollSamples {
    /// The RSS read, and then each process' tmpfs files (by descriptor and mapping).
    fn of(rss: Vec<(ProcRef, u64)>) -> Self {
        let mut devices = crate::os::shmem::Devices::default();
        let held = rss
            .iter()
            .filter_map(|&(process, _)| Some((process, procs::held(process, &mut devices)?)))
            .collect();
        Self { rss, held }
    }
}

fn sample_of(sample: &watchdog_common::RssSample) -> (ProcRef, u64) {
    (ProcRef::from(sample), sample.rss_bytes)
}

/// An `events` request, waiting for the ring to be drained.
type EventsQuery = (EventFilter, oneshot::Sender<Response>);

/// What waits for every kernel event sent before it to be taken in.
enum AfterDrain {
    /// An `events` request: a kill whose last exit was in the ring is answered.
    Events(EventsQuery),
    /// A launcher's exit: the children it forked before it died (their fork events
    /// may not have woken the daemon) are members before its launch ends.
    LauncherExit(ProcRef),
}

/// Asks the ring buffer reader to drain the ring now, and hands `query` back to the loop
/// (through `drained`) once it has: what it does then follows every kernel event sent
/// before it was asked, also those sent without a wake-up.
fn after_drain(
    drain: &mpsc::UnboundedSender<ingest::DrainRequest>,
    drained: &mpsc::UnboundedSender<AfterDrain>,
    query: AfterDrain,
) {
    let (tx, rx) = oneshot::channel();
    let _ = drain.send(tx);
    let drained = drained.clone();
    tokio::spawn(async move {
        // A reader that is gone answers nothing: the query is answered all the same.
        let _ = rx.await;
        let _ = drained.send(query);
    });
}

/// What the loop takes in.
enum Input {
    Events(ingest::Batch),
    Drained(AfterDrain),
    Call(Call),
    SyncProcesses,
    Heartbeat,
    LossCheck,
    Poll,
    PollDone((PollSamples, Instant)),
    LauncherExit(ProcRef),
    /// Kill targets described (and first signalled) off the loop.
    Described(Vec<Described>),
    Tick,
    Reload,
}

/// The loop's state: the rules core, the effects, and the bookkeeping of the I/O that
/// runs beside them.
struct Daemon {
    core: Core,
    effects: Effects,
    started: Instant,
    poll_interval: Duration,
    /// Kernel loss counters as of the last resync.
    losses_repaired: u64,
    /// The kernel may hold refused forks not recorded yet: looked at each loss check
    /// until none is (set by a refusal event, and at start for those of a daemon
    /// before).
    refusals_open: bool,
    /// How long the last reconcile poll took, µs (read off the loop + applied on it).
    last_poll_us: u64,
    /// A poll is reading: the next tick does not start another.
    polling: bool,
    poll_tx: mpsc::UnboundedSender<(PollSamples, Instant)>,
    /// The longest the loop took over one input since start.
    loop_longest: Duration,
    /// The RSS sum of each live analysis at each poll, bounded, for the live page.
    history: RssHistory,
    /// Where `events` asks the ring buffer reader to drain the ring, and where the query
    /// comes back once it has.
    drain: (
        mpsc::UnboundedSender<ingest::DrainRequest>,
        mpsc::UnboundedSender<AfterDrain>,
    ),
    /// Clients waiting for a run to end (`wait`), by run.
    waiters: Vec<(u64, oneshot::Sender<Response>)>,
}

impl Daemon {
    /// One input of the loop, handled: the one place every input and request is routed.
    fn on_input(
        &mut self,
        input: Input,
        inputs: &mut Inputs,
        options: &crate::app::config::Options,
    ) {
        match input {
            Input::Events(batch) => self.on_events(batch),
            Input::Call(call) => self.on_call(call, options.test_faults),
            Input::Drained(waiting) => {
                // Every event the ring held when this came is in the channel now: taken
                // in first.
                while let Ok(batch) = inputs.events.try_recv() {
                    self.on_events(batch);
                }
                match waiting {
                    AfterDrain::Events((filter, reply)) => self.answer_events(filter, reply),
                    AfterDrain::LauncherExit(launcher) => self.on_launcher_exit(launcher),
                }
            }
            Input::SyncProcesses => self.sync_processes(),
            Input::Heartbeat => supervise::heartbeat(&self.status_line()),
            Input::LossCheck => self.repair_losses(),
            Input::Poll => self.start_poll(),
            Input::PollDone(samples) => self.on_poll(samples),
            Input::LauncherExit(launcher) => after_drain(
                &self.drain.0,
                &self.drain.1,
                AfterDrain::LauncherExit(launcher),
            ),
            Input::Described(batch) => self.on_described(batch),
            Input::Tick => self.on_tick(),
            Input::Reload => {
                if let Some(every) = self.reload(options) {
                    inputs.repoll_every(every);
                }
            }
        }
    }

    /// A request: those that need more than the rules core (the store, the ring, the
    /// loop itself) are answered here; every other goes to the one dispatch.
    fn on_call(&mut self, (request, peer, reply): Call, test_faults: bool) {
        let clock = Clock::read();
        let routed = requests::route(
            &mut self.core,
            request,
            &peer,
            test_faults,
            &SysProcs,
            &clock,
            &mut self.effects,
        );
        match routed {
            Routed::Answered(response) => {
                self.settle(&clock);
                let _ = reply.send(response);
            }
            Routed::Status => self.answer_status(reply),
            Routed::Events(filter) => after_drain(
                &self.drain.0,
                &self.drain.1,
                AfterDrain::Events((filter, reply)),
            ),
            Routed::Overview => self.answer_overview(reply),
            Routed::Wait(run) => {
                self.waiters.push((run, reply));
                self.answer_waiters();
            }
            Routed::Stall(ms) => {
                let _ = reply.send(Response::Ok(Reply::Stalling { ms }));
                tracing::warn!(ms, "test fault: main loop stalled");
                std::thread::sleep(Duration::from_millis(ms));
            }
            Routed::Fault(what) => {
                match what {
                    TestFault::StorePanic => {
                        let _ = self.effects.store().send(StoreMsg::FailNextWrite);
                    }
                }
                let _ = reply.send(Response::Ok(Reply::FaultArmed { what }));
            }
        }
    }

    /// Hands what the rules asked for to the effects, and what the world answered back
    /// to the rules, until nothing is left to do.
    fn settle(&mut self, clock: &Clock) {
        loop {
            let actions = self.core.take_actions();
            if actions.is_empty() {
                self.answer_waiters();
                return;
            }
            for feedback in self.effects.apply(actions) {
                match feedback {
                    Feedback::SignalFailed(order) => {
                        self.core.on_signal_failed(order, &SysProcs, clock)
                    }
                }
            }
        }
    }

    /// Feeds one input to the rules with the time read once for it, then settles.
    fn feed(&mut self, input: impl FnOnce(&mut Core, &Clock)) {
        let clock = Clock::read();
        input(&mut self.core, &clock);
        self.settle(&clock);
    }

    /// A fresh start builds the tree from the (empty) map; a restart over pinned
    /// programs resumes the previous run's analyses, and so does one that dropped
    /// untrusted pins, once their surviving roots are watched again.
    fn start(&mut self) {
        if let Some(salvage) = self.effects.kernel.take_salvage() {
            let rewatched =
                crate::app::resume::rewatch(&mut self.effects, salvage, &SysProcs, &Clock::read());
            tracing::info!(
                ?rewatched,
                "saved analyses watched again over the fresh programs"
            );
        }
        let kernel = &self.effects.kernel;
        let in_map = kernel.watched();
        if kernel.resumed() {
            let saved = Saved {
                analyses: kernel.saved_analyses(),
                roots: kernel.roots(),
                launchers: kernel
                    .launchers()
                    .into_iter()
                    .map(|(pid, entry)| {
                        let launcher = ProcRef {
                            pid,
                            start_ns: entry.start_ns,
                        };
                        (launcher, entry.analysis)
                    })
                    .collect(),
                kills: kernel.kill_progress(),
            };
            self.feed(|core, clock| core.resume(&saved, &in_map, &SysProcs, clock));
        } else {
            self.feed(|core, clock| core.resync(&in_map, &SysProcs, clock, Resync::Start));
        }
    }

    /// Records each burst of forks the kernel refused once it is over: from the pinned
    /// counts, so a burst while no daemon ran is recorded by the next, once.
    fn record_refusals(&mut self) {
        if !self.refusals_open {
            return;
        }
        let (over, going_on) = self
            .effects
            .kernel
            .refusal_bursts(crate::vocab::process::boottime_ns());
        self.refusals_open = going_on;
        if !over.is_empty() {
            self.feed(|core, clock| core.forks_refused(&over, &SysProcs, clock));
        }
    }

    fn on_events(&mut self, mut batch: ingest::Batch) {
        if batch
            .iter()
            .any(|e| matches!(e, KernelEvent::Refused { .. }))
        {
            self.refusals_open = true;
        }
        let resynced_at_ns = self.core.resynced_at_ns();
        let kernel = &self.effects.kernel;
        // A fork queued before a resync: its exit may be among the lost events, and
        // then the kernel map (authoritative) no longer has it.
        let stale = |event: &KernelEvent| {
            matches!(*event, KernelEvent::Fork { pid, ts_ns, .. }
                if ts_ns <= resynced_at_ns && !kernel.is_watched(pid))
        };
        batch.retain(|e| !stale(e));
        // A kernel strike's entry holds what the kernel read of the process (command
        // line, uid): read here, in the event's turn, for its record.
        let kept = |event: &KernelEvent| match *event {
            KernelEvent::Struck { process, .. } => kernel.untaken_strike(process),
            _ => None,
        };
        let batch: Vec<(KernelEvent, Option<KillProgress>)> =
            batch.into_iter().map(|e| (e, kept(&e))).collect();
        self.feed(|core, clock| {
            for (event, kept) in batch {
                match (event, kept) {
                    (KernelEvent::Struck { process, .. }, Some(kept)) => {
                        core.take_up_strikes(&[(process.pid, kept)], &SysProcs, clock)
                    }
                    _ => core.on_event(event, &SysProcs, clock),
                }
            }
        });
    }

    fn on_described(&mut self, batch: Vec<Described>) {
        let (details, not_sent) = self.effects.take_described(batch);
        self.feed(|core, clock| core.on_described(&details, &not_sent, &SysProcs, clock));
    }

    fn on_tick(&mut self) {
        self.feed(|core, clock| core.on_tick(&SysProcs, clock));
    }

    fn on_launcher_exit(&mut self, launcher: ProcRef) {
        let roots = self.effects.launcher_exited(launcher);
        self.feed(|core, clock| {
            for root in roots {
                core.on_launcher_exit(root, &SysProcs, clock);
            }
        });
    }

    /// Processes the kernel map could not take go back into it once it has room (with
    /// what they forked meanwhile); launchers without a pidfd are checked in /proc.
    fn follow_untracked(&mut self) {
        self.effects.check_polled_launchers();
        for (process, key, mem_limit) in self.core.untracked() {
            let core = &self.core;
            let outcome = self
                .effects
                .retrack(process, key, mem_limit, &|pid| core.analysis_of(pid));
            self.feed(|core, clock| core.retracked(process, outcome, &SysProcs, clock));
        }
    }

    /// The reconcile poll: RSS of every watched process, read off the loop (in one
    /// pass by the kernel's RSS iterator, or from /proc where there is none).
    fn start_poll(&mut self) {
        if std::mem::replace(&mut self.polling, true) {
            return; // The last one is still reading.
        }
        let started = Instant::now();
        let tx = self.poll_tx.clone();
        match self.effects.kernel.rss_iter().map(ToOwned::to_owned) {
            Some(path) => {
                tokio::task::spawn_blocking(move || {
                    let samples = match kernel::read_rss_iter(&path) {
                        Ok(samples) => samples.iter().map(sample_of).collect(),
                        Err(err) => {
                            tracing::error!("{err:#}: this poll saw nothing");
                            Vec::new()
                        }
                    };
                    let _ = tx.send((PollSamples::of(samples), started));
                });
            }
            None => {
                let watched: Vec<ProcRef> = self.core.tree().iter().map(|n| n.proc_ref()).collect();
                tokio::task::spawn_blocking(move || {
                    let samples = watched
                        .into_iter()
                        .map(|p| (p, procs::rss_bytes(p.pid)))
                        .collect();
                    let _ = tx.send((PollSamples::of(samples), started));
                });
            }
        }
    }

    fn on_poll(&mut self, (samples, started): (PollSamples, Instant)) {
        self.feed(|core, clock| core.on_poll(&samples.rss, &samples.held, &SysProcs, clock));
        // Every RSS was just read: the sums are as fresh as they get.
        self.history
            .record(std::time::SystemTime::now(), overview::rss_sums(&self.core));
        self.polling = false;
        self.last_poll_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    }

    fn kernel_counters(&self) -> KernelCounters {
        KernelCounters {
            lost_events: self.effects.kernel.lost_events(),
            watch_map_full: self.effects.kernel.watch_map_full(),
            pinned_state_dropped: self.effects.kernel.pinned_state_dropped(),
            last_poll_us: self.last_poll_us,
            loop_longest_us: u64::try_from(self.loop_longest.as_micros()).unwrap_or(u64::MAX),
            faults: Faults {
                watched_capacity: self.effects.kernel.watched_capacity(),
                pidfd_failures: self.effects.pidfd_failures,
                kill_progress_unsaved: self.effects.kill_progress_unsaved,
                shm_unremoved: self.effects.shm_unremoved,
                launchers_watched: self.effects.launchers_watched(),
                program_errors: self
                    .effects
                    .kernel
                    .program_errors()
                    .into_iter()
                    .map(|(program, kind, n)| (format!("{program}/{kind}"), n))
                    .collect(),
                ..Faults::default()
            },
            records_unqueued: self.effects.unqueued() as u64,
            control: control::STATS.snapshot(),
            paths: self.effects.kernel.paths().to_vec(),
        }
    }

    fn status_line(&self) -> String {
        report::status_line(&self.core, self.effects.kernel.lost_events())
    }

    fn answer_events(&self, filter: EventFilter, reply: oneshot::Sender<Response>) {
        if let Some(before) = filter.before.as_deref()
            && crate::store::parse_cursor(before).is_none()
        {
            let line = format!(
                "--before takes the `next` of a previous events answer (TIME/ID), not {before:?}"
            );
            let _ = reply.send(Response::error(ErrorKind::BadRequest, line));
            return;
        }
        let page = usize::try_from(filter.max_records()).unwrap_or(usize::MAX);
        let (tx, rx) = oneshot::channel();
        let _ = self.effects.store().send(StoreMsg::Query(filter, tx));
        tokio::spawn(async move {
            let response = match rx.await {
                Ok((records, database_error)) => Response::Ok(Reply::Events {
                    next: (records.len() == page)
                        .then(|| records.last().map(|r| r.cursor()))
                        .flatten(),
                    records,
                    database_error,
                }),
                Err(_) => Response::error(ErrorKind::Unavailable, "the database writer stopped"),
            };
            let _ = reply.send(response);
        });
    }

    /// Answers the clients whose run has ended, once its records are in the spool; a
    /// run this daemon does not know is answered at once.
    fn answer_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        for (run, reply) in std::mem::take(&mut self.waiters) {
            match requests::ended(run, self.core.run_state(run)) {
                None => self.waiters.push((run, reply)),
                Some(response) => {
                    let (tx, rx) = oneshot::channel();
                    let _ = self.effects.store().send(StoreMsg::Spooled(tx));
                    tokio::spawn(async move {
                        // A store that stopped has its records spooled at shutdown.
                        let _ = rx.await;
                        let _ = reply.send(response);
                    });
                }
            }
        }
    }

    fn answer_overview(&self, reply: oneshot::Sender<Response>) {
        let overview = overview::overview(&self.core, &self.history, &Clock::read());
        let _ = reply.send(Response::Ok(Reply::Overview(Box::new(overview))));
    }

    fn answer_status(&self, reply: oneshot::Sender<Response>) {
        let mut status = report::status(
            &self.core,
            &self.kernel_counters(),
            self.started,
            self.poll_interval,
            &Clock::read(),
        );
        let (tx, rx) = oneshot::channel();
        let _ = self.effects.store().send(StoreMsg::Status(tx));
        tokio::spawn(async move {
            status.database = rx.await.unwrap_or_default();
            status.db = status.database.state.clone();
            let _ = reply.send(Response::Ok(Reply::Status(Box::new(status))));
        });
    }

    /// Sends what is watched now to the database writer, when it changed.
    fn sync_processes(&mut self) {
        if let Some(snapshot) = self.core.process_snapshot(&Clock::read()) {
            let _ = self.effects.store().send(StoreMsg::Processes(snapshot));
        }
    }

    /// When the kernel counted lost events (ring full) since the last look, the tree
    /// may be wrong: rebuild it. (A child the map had no room for is no loss: its
    /// fork event says so, and the rules follow it.)
    fn repair_losses(&mut self) {
        self.follow_untracked();
        self.record_refusals();
        let losses = self.effects.kernel.lost_events();
        if losses == self.losses_repaired {
            return;
        }
        tracing::warn!(
            lost = losses - self.losses_repaired,
            "kernel events were lost: resyncing the tree from the kernel map and /proc"
        );
        self.losses_repaired = losses;
        let in_map = self.effects.kernel.watched();
        // The kernel's SIGTERMs at memory crossings whose events may be among those lost.
        let kills = self.effects.kernel.kill_progress();
        self.feed(|core, clock| {
            core.resync(&in_map, &SysProcs, clock, Resync::LostEvents);
            core.take_up_strikes(&kills, &SysProcs, clock);
        });
    }

    /// SIGHUP: re-reads the settings; applies what can change while running (limits
    /// for new analyses, poll interval, dry run) and returns the new poll interval.
    /// A file that does not parse changes nothing.
    fn reload(&mut self, running: &crate::app::config::Options) -> Option<Duration> {
        let new = match running.args.resolve() {
            Ok(new) => new,
            Err(err) => {
                tracing::error!("{err:#}: keeping the running settings");
                return None;
            }
        };
        let needs_restart = new.socket != running.socket
            || new.socket_group != running.socket_group
            || new.state_dir != running.state_dir
            || new.pin_dir != running.pin_dir
            || new.http != running.http
            || new.kernel_log != running.kernel_log
            || new.database.as_ref().map(|u| &u.url) != running.database.as_ref().map(|u| &u.url);
        if needs_restart {
            tracing::warn!(
                "socket, socket group, database, state, pin, http and kernel-log settings change only with a restart"
            );
        }
        let kernel = &mut self.effects.kernel;
        if let Err(err) = kernel.set_memory_strike(new.memory_strike_off()) {
            tracing::error!("{err:#}: the programs keep the memory strike as it was");
        }
        if let Err(err) = kernel.set_fork_refusal(new.fork_refusal_off()) {
            tracing::error!("{err:#}: the programs keep the fork refusal as it was");
        }
        let settings = settings_of(&new, self.core.settings().machine_memory, kernel);
        self.core.set_settings(settings);
        self.poll_interval = new.poll_interval;
        tracing::info!(defaults = ?new.defaults, dry_run = new.dry_run, poll = ?new.poll_interval, "settings reloaded");
        Some(new.poll_interval)
    }
}
