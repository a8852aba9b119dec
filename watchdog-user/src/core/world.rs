//! The state every rule family shares, and the vocabulary of the core's inputs and
//! outputs: the tree of watched processes, the registry of analyses, the kill jobs in
//! progress, the settings, the counters, and the actions queued for the effects.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, bail};
use watchdog_common::{AnalysisEntry, KillProgress, RootEntry};

use crate::{
    core::{
        kill::{KillJob, SignalOrder},
        procs::ShmFile,
        registry::Registry,
        runs::Runs,
        shmem::ShmSeen,
        tree::Tree,
    },
    vocab::error::Error,
    vocab::{
        limits::{LimitOverrides, Limits},
        process::{AnalysisKey, ProcRef},
        record::KillRecord,
    },
};

/// Longest analysis id accepted: ids are labels, not payloads.
pub const MAX_ANALYSIS_ID: usize = watchdog_common::ANALYSIS_ID_MAX;
/// Records kept in memory for `status` (the database keeps them all).
pub const RECORDS_KEPT: usize = 10_000;
/// ...and at most this many bytes of them (`KillRecord::size_bytes`).
pub const RECORDS_KEPT_BYTES: usize = 8 << 20;
/// How long a killed analysis is kept once empty: a member whose fork event was lost
/// comes back with the next resync (the loss check runs every 200 ms) and is killed,
/// instead of finding its analysis forgotten and escaping.
pub const DYING_LINGER: Duration = Duration::from_secs(1);
/// The time, as the driver read it once for this input.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub now: Instant,
    pub wall: SystemTime,
    /// CLOCK_BOOTTIME ns: the clock of start times and kernel timestamps.
    pub boot_ns: u64,
}

impl Clock {
    pub fn read() -> Self {
        Self {
            now: Instant::now(),
            wall: SystemTime::now(),
            boot_ns: crate::vocab::process::boottime_ns(),
        }
    }

    /// The same clock `by` later (tests drive time with this).
    pub fn advanced(&self, by: Duration) -> Self {
        Self {
            now: self.now + by,
            wall: self.wall + by,
            boot_ns: self.boot_ns + crate::vocab::units::millis(by) * 1_000_000,
        }
    }
}

/// What the pinned maps kept of the previous run, for [`Core::resume`].
#[derive(Default)]
pub struct Saved {
    pub analyses: Vec<(AnalysisKey, AnalysisEntry)>,
    pub roots: Vec<(u32, RootEntry)>,
    /// The launches: (launcher, analysis).
    pub launchers: Vec<(ProcRef, AnalysisKey)>,
    /// The SIGTERMs of kills in progress: (pid, progress).
    pub kills: Vec<(u32, KillProgress)>,
}

/// What the rules ask the outside world to do.
#[derive(Debug)]
pub enum Action {
    /// Take the process out of the kernel's watched map.
    Unwatch(ProcRef),
    /// Keep the analysis in the kernel (pinned) map, for a restarted daemon.
    SaveAnalysis(AnalysisKey, Box<AnalysisEntry>),
    /// The analysis is over: drop it and its roots from the kernel maps.
    ForgetAnalysis(AnalysisKey, Vec<u32>),
    SaveRoot(u32, RootEntry),
    /// A root exited: its entry leaves the pinned map of roots.
    ForgetRoot(u32),
    /// The kernel stops putting the new children of this launcher in its analysis.
    Unlaunch(ProcRef),
    /// Tell the rules (`Core::on_launcher_exit`) when `launcher` exits: the parent,
    /// outside the analysis, of `root` (a registered root, or a member whose parent is
    /// outside its analysis).
    WatchLauncher {
        root: ProcRef,
        launcher: ProcRef,
    },
    /// The analysis' kill reached SIGKILL: the kernel kills its members at their forks.
    StopForks(AnalysisKey),
    /// `process`, watched through [`Action::WatchLauncher`], exited: its parent's exit
    /// no longer concerns it.
    ForgetParentWatch(ProcRef),
    /// Remove this file, left in tmpfs by a killed analysis (`--remove-shm`), while its
    /// path still names it.
    RemoveShm(ShmFile),
    /// Send this signal, to this process only (never to a recycled pid); report a
    /// failure with `Core::on_signal_failed`. A first signal (`describe`) is sent
    /// once the process' command line, owner and RSS are read, which come back with
    /// `Core::on_described`.
    Signal(SignalOrder),
    /// Read a process' command line, owner and RSS for its record (a kill that signals
    /// nothing: a dry run, a logged orphan); they come back with `Core::on_described`.
    Describe(ProcRef),
    /// A finished kill no longer needs a handle on this process.
    Release(ProcRef),
    /// `process` got its kill's SIGTERM: kept pinned, so that a restarted daemon ends
    /// its grace when this one would have.
    SaveKillProgress(ProcRef, Box<KillProgress>),
    /// The kill of `process` is over (or never signalled it): its pinned entry goes.
    ForgetKillProgress(ProcRef),
    /// A finished violation or kill: log it, spool it, store it.
    Record(Box<KillRecord>),
    /// The analysis' refused forks up to `total` are in a record: none is recorded again.
    RefusalsRecorded {
        analysis: AnalysisKey,
        total: u64,
    },
}

/// What can change while running (SIGHUP), and the facts of the machine they apply to.
#[derive(Clone, Debug)]
pub struct Settings {
    pub defaults: Limits,
    pub dry_run: bool,
    /// `--remove-shm`: the files a killed analysis left in tmpfs are removed.
    pub remove_shm: bool,
    /// The machine's total memory, bytes (read once at start; None if unreadable): no
    /// process' RSS can exceed it, so a per-process limit above it is refused.
    pub machine_memory: Option<u64>,
    /// Members of this group (`--admin-group`) may do everything root may.
    pub admin_gid: Option<u32>,
    /// What the per-process limit compares (the tree limit always counts PSS).
    pub memory_metric: crate::vocab::limits::MemoryMetric,
    /// What one user (not root, not the admin group) may hold at once.
    pub quotas: Quotas,
    /// The kernel refuses forks past an analysis' process limit: the tree's count
    /// (which hears of exits and forks a little late, and not always in their order)
    /// never kills for it.
    pub kernel_refuses_forks: bool,
}

/// What one user may hold at once, so that no member crowds out the others: the pinned
/// state keeps 16,384 analyses and 16,384 registered roots for everyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Analyses owned (`--user-max-analyses`).
    pub analyses: u64,
    /// Registered roots in the analyses owned (`--user-max-roots`).
    pub roots: u64,
    /// Watched processes in the analyses owned (`--user-max-processes`): the kernel adds
    /// a member's children without asking, so past it new registrations are refused.
    pub processes: u64,
    /// Records the user's analyses made in the last minute past which its new
    /// registrations are refused (`--user-max-records-per-minute`): every record of a
    /// kill is still kept, what is bounded is the work that makes more.
    pub records_per_minute: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            analyses: 1_024,
            roots: 4_096,
            processes: 16_384,
            // One kill of an analysis at the default --max-processes is 10,000 records.
            records_per_minute: 10_000,
        }
    }
}

/// How many records each user's analyses made in the last minute, in one-second
/// buckets (at most 60 a user).
#[derive(Default)]
pub struct RecordRates(HashMap<u32, VecDeque<(Instant, u64)>>);

/// The window [`RecordRates`] counts over.
pub const RECORD_WINDOW: Duration = Duration::from_secs(60);

impl RecordRates {
    pub fn count(&mut self, uid: u32, now: Instant) {
        let buckets = self.0.entry(uid).or_default();
        match buckets.back_mut() {
            Some((at, n)) if now.saturating_duration_since(*at) < Duration::from_secs(1) => *n += 1,
            _ => buckets.push_back((now, 1)),
        }
    }

    /// Drops the buckets older than the window.
    pub fn expire(&mut self, now: Instant) {
        self.0.retain(|_, buckets| {
            while buckets
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= RECORD_WINDOW)
            {
                buckets.pop_front();
            }
            !buckets.is_empty()
        });
    }

    /// Records of `uid`'s analyses in the window, as of the last expiry.
    pub fn in_window(&self, uid: u32) -> u64 {
        self.0
            .get(&uid)
            .map_or(0, |b| b.iter().map(|(_, n)| n).sum())
    }

    /// When the oldest bucket leaves the window.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.0
            .values()
            .filter_map(|b| b.front())
            .map(|(at, _)| *at + RECORD_WINDOW)
            .min()
    }
}

impl Settings {
    /// Why the default per-process memory limit can never be reached here, if it
    /// cannot: the daemon warns at start and on reload (it is not refused: analyses
    /// keep it, unenforceable, unless they pass a limit of their own).
    pub fn unreachable_default(&self) -> Option<String> {
        let total = self.machine_memory?;
        let limit = self.defaults.memory_bytes;
        (limit > total).then(|| {
            format!(
                "the default memory limit {} is more than this machine's {}: it can never \
                 be reached, so analyses that keep it have no memory limit; set \
                 --default-memory to at most {}",
                crate::vocab::units::size_rounded(limit, true),
                crate::vocab::units::size_rounded(total, false),
                crate::vocab::units::size_rounded(total, false),
            )
        })
    }

    /// Refuses a per-process memory limit asked for above the machine's memory: no
    /// process could reach it, so it would watch nothing. (The tree limit is not
    /// checked: RSS summed over processes counts the pages they share once per process,
    /// e.g. after fork, so the sum can exceed the machine's memory.)
    pub fn check_reachable(&self, overrides: &LimitOverrides) -> Result<()> {
        let (Some(total), Some(limit)) = (self.machine_memory, overrides.memory_bytes) else {
            return Ok(());
        };
        if limit > total {
            let at_most = crate::vocab::units::size_rounded(total, false);
            bail!(Error::bad_request(format!(
                "the memory limit {} is more than this machine's {at_most}: it could never \
                 be reached; use at most {at_most} (nothing was registered)",
                crate::vocab::units::size_rounded(limit, true)
            )));
        }
        Ok(())
    }
}

#[derive(Default, Clone, Debug)]
pub struct Counters {
    pub forks: u64,
    pub exits: u64,
    pub execs: u64,
    pub resyncs: u64,
    pub rss_reports: u64,
    /// Processes recorded as killed (or would-be killed in a dry run).
    pub kills: u64,
    pub kills_by_reason: BTreeMap<&'static str, u64>,
    /// Children the kernel map could not take, followed by the rules instead.
    pub untracked_forks: u64,
    /// Memory kills whose SIGTERM the kernel sent itself, at the crossing.
    pub kernel_strikes: u64,
    /// Forks the kernel refused, as recorded.
    pub forks_refused: u64,
}

/// Why the tree is rebuilt from the kernel map; only a repair after lost events counts
/// as a resync in `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    Start,
    Restart,
    LostEvents,
}

/// What every rule reads and the kill machinery changes. Each rule family keeps its own
/// state beside this (`core::rules`); only the core's dispatch holds both.
pub struct World {
    pub tree: Tree,
    pub registry: Registry,
    pub jobs: Vec<KillJob>,
    pub settings: Settings,
    pub counters: Counters,
    /// Finished violations and kills, newest last (bounded).
    pub recent: VecDeque<KillRecord>,
    /// What `recent` holds, bytes.
    pub recent_bytes: usize,
    pub host: String,
    pub self_pid: u32,
    pub actions: Vec<Action>,
    /// The tree changed since `watchdog_processes` was last brought up to date.
    pub processes_dirty: bool,
    /// CLOCK_BOOTTIME of the last resync: fork events from before it may describe
    /// processes whose exits were lost.
    pub resynced_at_ns: u64,
    /// Killed analyses with no member left, and when they are forgotten.
    pub lingering: BTreeMap<AnalysisKey, Instant>,
    /// Analyses forgotten since the rule families last dropped what they keep of them.
    pub forgotten: Vec<AnalysisKey>,
    /// How each run ended, for the clients that wait for it.
    pub runs: Runs,
    /// Records per user in the last minute (the owners of the analyses killed).
    pub record_rates: RecordRates,
    /// SIGTERMs an earlier daemon's kills sent, by pid, until a kill takes them up or
    /// their process leaves the tree.
    pub earlier_sigterms: HashMap<u32, KillProgress>,
    /// Memory outside RSS (tmpfs files), as of the last poll.
    pub shm: ShmSeen,
}

impl World {
    pub fn new(settings: Settings, host: String, self_pid: u32) -> Self {
        Self {
            tree: Tree::default(),
            registry: Registry::default(),
            jobs: Vec::new(),
            settings,
            counters: Counters::default(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            host,
            self_pid,
            actions: Vec::new(),
            processes_dirty: true,
            resynced_at_ns: 0,
            lingering: BTreeMap::new(),
            forgotten: Vec::new(),
            runs: Runs::default(),
            record_rates: RecordRates::default(),
            earlier_sigterms: HashMap::new(),
            shm: ShmSeen::default(),
        }
    }

    /// When the kills next need the clock: the end of a grace, or a lingering
    /// analysis' time to be forgotten.
    pub fn kills_wakeup(&self) -> Option<Instant> {
        let graces = self.jobs.iter().filter_map(KillJob::wakeup);
        graces.chain(self.lingering.values().copied()).min()
    }
}
