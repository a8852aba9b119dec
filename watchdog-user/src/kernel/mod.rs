//! Loads and attaches the kernel programs, and wraps the maps the daemon shares with them.

pub mod btf;
pub mod forks;
pub mod ingest;
pub mod memlock;
pub mod pins;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, Iter, links::FdLink},
};
use watchdog_common::{
    ANALYSES_MAP, AnalysisEntry, CONFIG_GLOBAL, DESCENDANTS_ITER, DROPS_MAP, DYING_MAP, ERRORS_MAP,
    EVENTS_MAP, FORK_LIMITS_MAP, ForkLimit, INITIAL_PID_NS_INUM, KERNEL_LOG_MAP, KILLS_MAP,
    KillProgress, LAUNCHERS_MAP, LAYOUT, LAYOUT_MAP, LOGS_MAP, MEMBERS_MAP, Members,
    PENDING_FORKS_MAP, PID_NS_MAP, PIDNS_ITER, PROGRAM_ERRORS, PROGRAM_NAMES, PidNs, ProcRecord,
    RING_BYTES, ROOTS_MAP, RSS_ITER, RootEntry, RssSample, STRIKE_MEMORY, STRIKES_MAP,
    TREE_RSS_MAP, TreeRss, WALK_TARGET_MAP, WATCH_FULL_MAP, WATCHED_MAP, WalkTarget, WatchEntry,
};

use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    kernel::{
        btf::KernelBtf,
        memlock::{MapShape, Shortfall},
        pins::{Salvage, Verdict},
    },
    vocab::{error::Error, kernel::KernelPath, process::ProcRef},
};

/// The object built by watchdog-user's build.rs from watchdog-ebpf.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watchdog"));

/// The tracepoints we attach to, each by a program of the same name.
const TRACEPOINTS: [&str; 4] = [
    "sched_process_fork",
    "sched_process_exit",
    "sched_process_exec",
    "rss_stat",
];

/// Reads the programs' error reports (aya-log records in `AYA_LOGS`) and hands them to
/// the `log` crate, which tracing-subscriber's LogTracer forwards to the daemon's log.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

pub struct Kernel {
    /// Owns the loaded object; the links are pinned, so they outlive it.
    _ebpf: Ebpf,
    watched: HashMap<MapData, u32, WatchEntry>,
    drops: PerCpuArray<MapData, u64>,
    watch_full: PerCpuArray<MapData, u64>,
    errors: PerCpuArray<MapData, u64>,
    /// How many processes the watched map holds at most.
    watched_capacity: u32,
    analyses: HashMap<MapData, u64, AnalysisEntry>,
    roots: HashMap<MapData, u32, RootEntry>,
    launchers: HashMap<MapData, u32, WatchEntry>,
    tree_rss: HashMap<MapData, u64, TreeRss>,
    /// Analyses whose members the fork program kills at their forks.
    dying: HashMap<MapData, u64, u64>,
    /// Processes a kill has sent SIGTERM, and when their grace ends.
    kills: HashMap<MapData, u32, KillProgress>,
    /// What the programs may signal themselves ([`STRIKES_MAP`]), and the bits set.
    strikes: Array<MapData, u32>,
    strike_bits: u32,
    /// Each analysis' member count: the programs' part and refusals, and the limit with
    /// the daemon's part ([`forks`]).
    members: HashMap<MapData, u64, Members>,
    fork_limits: HashMap<MapData, u64, ForkLimit>,
    /// Why the fork refusal is not attached (None: it is).
    lsm_off: Option<String>,
    /// The programs read this kernel's RSS counters at each change: the memory strike
    /// can work here.
    memory_events: bool,
    resumed: bool,
    /// Pinned state was found untrustworthy and dropped at load (1), or not (0).
    pinned_state_dropped: u64,
    /// What the dropped state's analyses and roots were, when they could be read: for
    /// [`pins::rewatch`].
    salvage: Option<Salvage>,
    /// There was such a salvage: the rules resume what it put back.
    rebuilt: bool,
    /// The pinned RSS iterator, when this kernel has task iterators and per-CPU RSS
    /// counters: reading it is the reconcile poll.
    rss_iter: Option<PathBuf>,
    walk_target: Array<MapData, WalkTarget>,
    /// The pinned descendants iterator; without it registration scans /proc.
    descendants_iter: Option<PathBuf>,
    /// The reader of the programs' error reports, with `--kernel-log`, until taken.
    logger: Option<KernelLogger>,
    /// How this kernel lets each part work, for `status`.
    paths: Vec<KernelPath>,
}

/// Attaches a task iterator and pins its link: each read of the pin runs it afresh.
/// None (with a warning naming the fallback) where the kernel cannot run it.
fn attach_iter(
    ebpf: &mut Ebpf,
    btf: &Btf,
    pin_dir: &Path,
    name: &str,
    fallback: &str,
) -> Option<PathBuf> {
    let mut attach = || -> Result<PathBuf> {
        let link: FdLink = start_iter(ebpf, btf, name)?.try_into()?;
        let path = iter_pin(pin_dir, name);
        link.pin(&path)?;
        Ok(path)
    };
    attach()
        .inspect_err(|e| tracing::warn!("no {name} task iterator ({e:#}): {fallback}"))
        .ok()
}

/// Loads the task iterator `name` and attaches it: its link, to pin or read.
fn start_iter(ebpf: &mut Ebpf, btf: &Btf, name: &str) -> Result<aya::programs::iter::IterLink> {
    let program: &mut Iter = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()?;
    program.load("task", btf)?;
    let link_id = program.attach()?;
    Ok(program.take_link(link_id)?)
}

fn iter_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("iter_{name}"))
}

/// `err`, its text unchanged, of kind unavailable: a kernel map refusing an entry (full,
/// out of memory) or an iterator failing is the daemon's state, not the request's.
fn unavailable(err: anyhow::Error) -> anyhow::Error {
    Error::unavailable(format!("{err:#}")).into()
}

/// Runs a pinned iterator and reads its records.
fn read_iter<T: Copy>(path: &Path) -> Result<Vec<T>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading the task iterator {}", path.display()))?;
    Ok(bytes
        .chunks_exact(size_of::<T>())
        // SAFETY: the iterator writes whole records of this #[repr(C)] type.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) })
        .collect())
}

/// Runs the pinned RSS iterator: every watched process and its RSS, in one pass.
pub fn read_rss_iter(path: &Path) -> Result<Vec<RssSample>> {
    read_iter(path)
}

/// Loads and attaches every program, and pins each link so the programs stay attached
/// when this daemon exits or dies.
fn attach_and_pin(ebpf: &mut Ebpf, btf: &Btf, pin_dir: &Path) -> Result<()> {
    for tracepoint in TRACEPOINTS {
        let program: &mut BtfTracePoint = ebpf
            .program_mut(tracepoint)
            .with_context(|| format!("program {tracepoint} missing from the eBPF object"))?
            .try_into()?;
        program
            .load(tracepoint, btf)
            .map_err(|e| refused(&format!("verify the {tracepoint} program"), e))?;
        let link_id = program
            .attach()
            .map_err(|e| refused(&format!("attach to tracepoint {tracepoint}"), e))?;
        let link: FdLink = program.take_link(link_id)?.into();
        link.pin(link_pin(pin_dir, tracepoint))
            .map_err(|e| refused(&format!("pin the {tracepoint} link"), e))?;
    }
    Ok(())
}

/// Turns the loader's error chain into one line that names the fix.
/// Whether `refused` said the kernel denied permission (EPERM or EACCES, no verifier
/// log): what a map charge past RLIMIT_MEMLOCK returns too.
fn is_permission_refusal(err: &anyhow::Error) -> bool {
    err.to_string().contains("(permission denied)")
}

fn refused(what: &str, err: impl Into<anyhow::Error>) -> anyhow::Error {
    let err = err.into();
    let chain = format!("{err:#}");
    // The verifier refuses a program with EACCES too: that is no question of privilege,
    // and its last lines say why.
    if let Some((_, log)) = chain.split_once("Verifier output:")
        && !log.trim().is_empty()
    {
        let tail: Vec<&str> = log.trim().lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return anyhow!(
            "the kernel's verifier refused to {what}: {}",
            tail.join(" | ")
        );
    }
    let denied = err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    }) || chain.contains("Operation not permitted")
        || chain.contains("Permission denied");
    if denied {
        anyhow!(
            "the kernel refused to {what} (permission denied): run the daemon as root \
             (sudo watchdog-user run) or with CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE"
        )
    } else {
        anyhow!("the kernel refused to {what}: {chain}")
    }
}

/// Removes `process`' entry from a pid-keyed map, unless the pid names another
/// process' entry by now (its start time, read by `start_of`, differs).
fn remove_if_same<V: aya::Pod>(
    map: &mut HashMap<MapData, u32, V>,
    process: ProcRef,
    start_of: impl Fn(&V) -> u64,
) {
    let same = map
        .get(&process.pid, 0)
        .is_ok_and(|e| start_of(&e) == process.start_ns);
    if same {
        let _ = map.remove(&process.pid);
    }
}

/// The maps pinned under the pin directory, by name.
const PINNED_MAPS: [&str; 20] = [
    WATCHED_MAP,
    EVENTS_MAP,
    DROPS_MAP,
    WATCH_FULL_MAP,
    ERRORS_MAP,
    ANALYSES_MAP,
    ROOTS_MAP,
    // Launchers keep handing their children to their analyses while no daemon runs.
    LAUNCHERS_MAP,
    // The sums go on while no daemon runs, and stay equal to their processes' parts.
    TREE_RSS_MAP,
    // A dying analysis' members die at their forks also while no daemon runs.
    DYING_MAP,
    // A kill's grace goes on across restarts: a restarted daemon SIGKILLs when it ends.
    KILLS_MAP,
    // What the programs signal themselves, also while no daemon runs.
    STRIKES_MAP,
    // Forks are counted and refused also while no daemon runs.
    MEMBERS_MAP,
    FORK_LIMITS_MAP,
    PENDING_FORKS_MAP,
    // Pinned too so that a restarted daemon writes the map the pinned iterator reads.
    WALK_TARGET_MAP,
    // The error reports and their switch: a restarted daemon reads the reports the
    // resumed programs write, and turns them on or off for them.
    LOGS_MAP,
    KERNEL_LOG_MAP,
    // The PID namespace whose pids the pinned programs report: a restarted daemon
    // resumes them only in that same namespace.
    PID_NS_MAP,
    // This build's LAYOUT, written once the programs are attached: checked first.
    LAYOUT_MAP,
];

/// Maps whose size the loader sets: a pin keeps the size it was made with.
const SIZED_AT_LOAD: [&str; 2] = [EVENTS_MAP, WATCHED_MAP];

/// Maps every attached tracepoint program of ours uses.
const USED_BY_PROGRAMS: [&str; 2] = [WATCHED_MAP, EVENTS_MAP];

/// What the pinned state must be for this build to trust it.
fn expected_pins(pin_dir: &Path) -> pins::Expected<'static> {
    let tracepoints = TRACEPOINTS
        .iter()
        .map(|&tp| (link_pin(pin_dir, tp), tp, true));
    let iters = [RSS_ITER, DESCENDANTS_ITER]
        .into_iter()
        .map(|name| (iter_pin(pin_dir, name), name, false));
    let lsm = forks::LSM_HOOKS
        .into_iter()
        .map(|hook| (forks::lsm_link_pin(pin_dir, hook), hook, false));
    pins::Expected {
        maps: &PINNED_MAPS,
        sized_at_load: &SIZED_AT_LOAD,
        used_by_programs: &USED_BY_PROGRAMS,
        links: tracepoints.chain(iters).chain(lsm).collect(),
        object: PROGRAMS,
    }
}

/// Drops pinned state that failed its checks, in one log line that says why and what
/// is kept: the saved analyses and roots are read first when their layout is ours.
fn drop_untrusted(pin_dir: &Path, reason: &str) -> Result<Option<Salvage>> {
    let salvage = pins::salvage(pin_dir, &expected_pins(pin_dir));
    tracing::warn!("{}", pins::dropping_line(pin_dir, reason, &salvage));
    drop_pins(pin_dir)?;
    Ok(salvage.ok())
}

fn link_pin(pin_dir: &Path, tracepoint: &str) -> PathBuf {
    pin_dir.join(format!("link_{tracepoint}"))
}

/// Whether a previous daemon left its programs attached (all links pinned).
fn programs_pinned(pin_dir: &Path) -> bool {
    TRACEPOINTS.iter().all(|tp| link_pin(pin_dir, tp).exists())
}

/// Drops pinned state: unpinning the links detaches the programs, and the maps go with
/// their last reference.
pub fn drop_pins(pin_dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(pin_dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing the pinned state in {}", pin_dir.display()))
        }
        _ => Ok(()),
    }
}

/// bpffs must be mounted where we pin (systemd mounts /sys/fs/bpf; a bare machine may not).
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = Path::new("/sys/fs/bpf");
    let mounted = |path: &Path| {
        nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
    };
    let parent = pin_dir.parent().unwrap_or(root);
    if !mounted(parent) {
        if parent != root {
            bail!(
                "{} is not on a bpffs: pass a --pin-dir under /sys/fs/bpf",
                pin_dir.display()
            );
        }
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| anyhow!("bpffs is not mounted at /sys/fs/bpf and mounting it failed ({e}): mount -t bpf bpf /sys/fs/bpf"))?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating the pin directory {}", pin_dir.display()))
}

impl Kernel {
    /// Loads the programs with this kernel's struct offsets and attaches them, with maps
    /// and links pinned under `pin_dir` so that they outlive this daemon. When a previous
    /// daemon's programs are still attached there, they are kept (they never stopped
    /// following the watched processes) and only the maps are reopened: `resumed` says so.
    /// Returns the kernel handle and the ring buffer for [`crate::ingest`].
    /// `ring_bytes` overrides the ring buffer's size (a power of two, at least a page).
    /// `kernel_log` turns the programs' error reports on (and keeps their reader for
    /// [`Self::take_logger`]) or off. `watched_capacity` overrides the watched map's
    /// capacity (the host's `pid_max`), for tests that fill it.
    pub fn load(
        btf_path: &Path,
        ring_bytes: Option<u32>,
        watched_capacity: Option<u32>,
        pin_dir: &Path,
        fresh: bool,
        kernel_log: bool,
    ) -> Result<(Self, RingBuf<MapData>)> {
        let pid_ns = crate::os::procs::own_pid_ns()?;
        let in_pid_ns = pid_ns != INITIAL_PID_NS_INUM;
        let (mut config, mut paths) = KernelBtf::from_file(btf_path)?.program_config(in_pid_ns)?;
        config.wake_watermark = u64::from(ring_bytes.unwrap_or(RING_BYTES) / 4);
        config.ns_per_tick = crate::vocab::process::ns_per_tick();
        tracing::debug!(?config, "offsets read from kernel BTF");
        // EbpfLoader::new() parses /sys/kernel/btf/vmlinux for itself (~15 MiB of heap);
        // it is given ours (from --btf) instead, so drop its copy before parsing ours:
        // one parsed BTF alive at a time, not two.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let btf = Btf::parse_file(btf_path, Endianness::default())
            .map_err(|e| anyhow!("kernel BTF at {} is unusable: {e}", btf_path.display()))?;
        let watched_capacity = watched_capacity.unwrap_or_else(pid_max);
        let (bpf_memory, memlock_shortfall) = memlock::prepare(
            kernel_release(),
            maps_charge(watched_capacity, ring_bytes.unwrap_or(RING_BYTES)),
        );
        paths.push(bpf_memory);
        // Pinned state is resumed only once checked (see `pins`); anything else is
        // said, counted and dropped, keeping what can be read of it.
        let mut dropped = None;
        if fresh {
            drop_pins(pin_dir)?;
        } else {
            match pins::check(pin_dir, &expected_pins(pin_dir)) {
                Verdict::Nothing => drop_pins(pin_dir)?,
                Verdict::Trusted => {}
                Verdict::Distrusted(reason) => dropped = Some(drop_untrusted(pin_dir, &reason)?),
            }
        }
        ensure_bpffs(pin_dir).map_err(|e| refused("pin its maps", e))?;
        let resumed = programs_pinned(pin_dir);
        let sizes = Sizes {
            ring_bytes,
            watched_capacity,
            pid_ns,
            memlock_shortfall,
        };
        let mut loaded =
            Self::load_pinned(loader, &btf, &config, sizes, pin_dir, resumed, kernel_log);
        if resumed && let Err(err) = &loaded {
            // Checked, and still not resumable: a restart would find it the same, so
            // drop it rather than exit into a crash loop.
            let reason = format!("resuming it failed ({err:#})");
            dropped = Some(drop_untrusted(pin_dir, &reason)?);
            ensure_bpffs(pin_dir).map_err(|e| refused("pin its maps", e))?;
            let mut loader = EbpfLoader::new();
            loader.btf(None);
            loaded = Self::load_pinned(loader, &btf, &config, sizes, pin_dir, false, kernel_log);
        }
        if loaded.is_err() && (!resumed || dropped.is_some()) {
            // Refused: leave no half-made pinned state behind.
            let _ = drop_pins(pin_dir);
        }
        if let Ok((kernel, _)) = &mut loaded {
            kernel.memory_events = config.rss_enabled != 0;
            paths.extend(kernel.iterator_paths(&config));
            log_paths(&paths);
            kernel.paths = paths;
        }
        if let (Ok((kernel, _)), Some(salvage)) = (&mut loaded, dropped) {
            kernel.pinned_state_dropped = 1;
            kernel.rebuilt = salvage.is_some();
            kernel.salvage = salvage;
        }
        drop(btf);
        release_free_heap();
        loaded
    }

    /// Loads the object with its maps pinned in `pin_dir`: the programs attached there
    /// are resumed (`resumed`), or attached anew.
    fn load_pinned<'a>(
        mut loader: EbpfLoader<'a>,
        btf: &'a Btf,
        config: &'a watchdog_common::Config,
        sizes: Sizes,
        pin_dir: &Path,
        resumed: bool,
        kernel_log: bool,
    ) -> Result<(Self, RingBuf<MapData>)> {
        loader
            .btf(Some(btf))
            .override_global(CONFIG_GLOBAL, config, true);
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let watched_capacity = size_maps(&mut loader, sizes, pin_dir, resumed);
        let mut ebpf = loader.load(PROGRAMS).map_err(|e| {
            let err = refused("load the watchdog's eBPF maps and programs", e);
            match sizes.memlock_shortfall {
                Some(shortfall) if is_permission_refusal(&err) => {
                    memlock::refusal(shortfall, sizes.watched_capacity)
                }
                _ => err,
            }
        })?;
        let iters = if resumed {
            resume_attached(&ebpf, sizes.pid_ns, pin_dir)?
        } else {
            attach_anew(&mut ebpf, btf, config, sizes.pid_ns, pin_dir)?
        };
        let ring = RingBuf::try_from(take(&mut ebpf, EVENTS_MAP)?)?;
        let logger = set_kernel_log(&mut ebpf, kernel_log)?;
        let kernel = Self::from_maps(ebpf, watched_capacity, resumed, iters, logger)?;
        Ok((kernel, ring))
    }

    /// Takes the maps the daemon reads and writes out of the loaded object, which it
    /// keeps (its programs stay loaded with it).
    fn from_maps(
        mut ebpf: Ebpf,
        watched_capacity: u32,
        resumed: bool,
        iters: Iters,
        logger: Option<KernelLogger>,
    ) -> Result<Self> {
        Ok(Self {
            watched: HashMap::try_from(take(&mut ebpf, WATCHED_MAP)?)?,
            drops: PerCpuArray::try_from(take(&mut ebpf, DROPS_MAP)?)?,
            watch_full: PerCpuArray::try_from(take(&mut ebpf, WATCH_FULL_MAP)?)?,
            errors: PerCpuArray::try_from(take(&mut ebpf, ERRORS_MAP)?)?,
            watched_capacity,
            analyses: HashMap::try_from(take(&mut ebpf, ANALYSES_MAP)?)?,
            roots: HashMap::try_from(take(&mut ebpf, ROOTS_MAP)?)?,
            launchers: HashMap::try_from(take(&mut ebpf, LAUNCHERS_MAP)?)?,
            tree_rss: HashMap::try_from(take(&mut ebpf, TREE_RSS_MAP)?)?,
            dying: HashMap::try_from(take(&mut ebpf, DYING_MAP)?)?,
            kills: HashMap::try_from(take(&mut ebpf, KILLS_MAP)?)?,
            strikes: Array::try_from(take(&mut ebpf, STRIKES_MAP)?)?,
            strike_bits: 0,
            members: HashMap::try_from(take(&mut ebpf, MEMBERS_MAP)?)?,
            fork_limits: HashMap::try_from(take(&mut ebpf, FORK_LIMITS_MAP)?)?,
            lsm_off: iters.lsm_off,
            memory_events: false,
            resumed,
            pinned_state_dropped: 0,
            salvage: None,
            rebuilt: false,
            rss_iter: iters.rss,
            walk_target: Array::try_from(take(&mut ebpf, WALK_TARGET_MAP)?)?,
            descendants_iter: iters.descendants,
            logger,
            paths: Vec::new(),
            _ebpf: ebpf,
        })
    }

    /// The reader of the programs' error reports, when loaded with `kernel_log`.
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// The pinned RSS iterator, if this kernel runs one (see [`read_rss_iter`]).
    pub fn rss_iter(&self) -> Option<&Path> {
        self.rss_iter.as_deref()
    }

    /// Whether this daemon took over programs a previous one left attached, or dropped
    /// untrusted pins and has the previous run's analyses to watch again
    /// ([`Self::take_salvage`]): either way the rules resume the saved analyses.
    pub fn resumed(&self) -> bool {
        self.resumed || self.rebuilt
    }

    /// Untrusted pinned state dropped at load: 1, else 0 (status, /metrics).
    pub fn pinned_state_dropped(&self) -> u64 {
        self.pinned_state_dropped
    }

    /// The dropped state's analyses and roots, to watch again over the fresh programs.
    pub fn take_salvage(&mut self) -> Option<Salvage> {
        self.salvage.take()
    }

    /// Saves the analysis for a restarted daemon and, with a tree memory limit, starts
    /// its sum in the kernel (a sum already there, resumed, goes on).
    pub fn save_analysis(&mut self, key: u64, entry: &AnalysisEntry) -> Result<()> {
        self.analyses
            .insert(key, entry, 0)
            .context("saving the analysis in the kernel map")?;
        let limits = crate::vocab::limits::Limits::from_slots(&entry.limits);
        self.set_fork_limit(key, limits.max_processes)?;
        if limits.tree_memory_bytes.is_some() && self.tree_rss.get(&key, 0).is_err() {
            self.tree_rss
                .insert(key, TreeRss::default(), 0)
                .context("starting the analysis' RSS sum in the kernel map (its tree limit waits for the poll)")?;
        }
        Ok(())
    }

    pub fn forget_analysis(&mut self, key: u64, roots: &[u32]) {
        let _ = self.analyses.remove(&key);
        let _ = self.tree_rss.remove(&key);
        let _ = self.dying.remove(&key);
        self.forget_member_count(key);
        for pid in roots {
            let _ = self.roots.remove(pid);
        }
    }

    /// From now on a member of analysis `key` that forks is SIGKILLed at its fork.
    pub fn stop_forks(&mut self, key: u64) -> Result<()> {
        self.dying
            .insert(key, 0, 0)
            .context("marking the analysis dying in the kernel map")
    }

    /// `process` got its kill's SIGTERM: a restarted daemon ends its grace when `progress`
    /// says, not later.
    pub fn save_kill_progress(&mut self, process: ProcRef, progress: &KillProgress) -> Result<()> {
        self.kills
            .insert(process.pid, progress, 0)
            .with_context(|| format!("saving the kill of {} in the kernel map", process.pid))
    }

    /// The kill of `process` is over: its entry goes, unless the pid names a newer kill's
    /// target by now.
    pub fn forget_kill_progress(&mut self, process: ProcRef) {
        remove_if_same(&mut self.kills, process, |e| e.start_ns);
    }

    /// Lets the programs send a memory kill's SIGTERM themselves, at the crossing, or
    /// not (`off`: why the daemon does not let them); said in `status` as the path
    /// `memory_first_signal`. Where the programs do not follow this kernel's RSS
    /// counters, the daemon sends it, whatever is asked.
    pub fn set_memory_strike(&mut self, off: Option<&str>) -> Result<()> {
        let path = match (self.memory_events, off) {
            (false, _) => KernelPath::new(
                "memory_first_signal",
                "daemon",
                "the programs cannot read this kernel's RSS counters: the daemon signals at the reconcile poll",
            ),
            (true, Some(why)) => KernelPath::new("memory_first_signal", "daemon", why),
            (true, None) => KernelPath::new(
                "memory_first_signal",
                "kernel",
                "the rss_stat program sends SIGTERM the moment a process crosses its limit in its own page fault",
            ),
        };
        self.set_strike(STRIKE_MEMORY, path.how == "kernel")?;
        self.paths.retain(|p| p.path != path.path);
        self.paths.push(path);
        Ok(())
    }

    /// Lets the programs act on `bit` of [`STRIKES_MAP`] themselves, or not.
    fn set_strike(&mut self, bit: u32, on: bool) -> Result<()> {
        let bits = if on {
            self.strike_bits | bit
        } else {
            self.strike_bits & !bit
        };
        self.strikes
            .set(0, bits, 0)
            .context("setting what the programs may do themselves (STRIKES)")?;
        self.strike_bits = bits;
        Ok(())
    }

    /// The entry the kernel wrote when it sent `process` SIGTERM, while no daemon has
    /// taken it up yet.
    pub fn untaken_strike(&self, process: ProcRef) -> Option<KillProgress> {
        self.kills.get(&process.pid, 0).ok().filter(|p| {
            p.start_ns == process.start_ns && p.struck_boot_ns != 0 && p.escalate_boot_ns == 0
        })
    }

    /// The kills in progress the pinned map kept: (pid, progress).
    pub fn kill_progress(&self) -> Vec<(u32, KillProgress)> {
        self.kills.iter().filter_map(|r| r.ok()).collect()
    }

    /// The living descendants of `root` (not the root itself), from the kernel's
    /// descendants iterator, or from a /proc scan where the kernel has none.
    pub fn descendants(&mut self, root: ProcRef) -> Result<Vec<ProcRecord>> {
        let Some(path) = &self.descendants_iter else {
            return Ok(crate::os::procs::descendants_by_scan(root.pid));
        };
        let tick = crate::vocab::process::ns_per_tick();
        let target = WalkTarget {
            pid: root.pid,
            _pad: 0,
            // /proc's start times are whole ticks: a process that /proc says started at
            // the root's tick may have started a little before it in ns.
            start_ns: root.start_ns - root.start_ns % tick,
        };
        self.walk_target
            .set(0, target, 0)
            .context("naming the root for the descendants iterator")
            .map_err(unavailable)?;
        let younger = read_iter(path).map_err(unavailable)?;
        Ok(crate::os::procs::descendants_among(root.pid, younger))
    }

    /// The saved analyses, without any no daemon could have saved.
    pub fn saved_analyses(&self) -> Vec<(u64, AnalysisEntry)> {
        pins::sane_analyses(self.analyses.iter().filter_map(|r| r.ok()))
    }

    pub fn save_root(&mut self, pid: u32, entry: &RootEntry) -> Result<()> {
        self.roots
            .insert(pid, entry, 0)
            .context("saving the root in the kernel map")
    }

    pub fn forget_root(&mut self, pid: u32) {
        let _ = self.roots.remove(&pid);
    }

    pub fn roots(&self) -> Vec<(u32, RootEntry)> {
        self.roots.iter().filter_map(|r| r.ok()).collect()
    }

    /// From now on the kernel puts each child `launcher` forks in analysis `analysis`.
    pub fn launch(
        &mut self,
        launcher: ProcRef,
        analysis: u64,
        levels: crate::vocab::limits::RssLevels,
    ) -> Result<()> {
        self.launchers
            .insert(launcher.pid, watch_entry(launcher, analysis, levels), 0)
            .with_context(|| format!("adding launcher {} to the kernel's map", launcher.pid))
            .map_err(unavailable)
    }

    pub fn unlaunch(&mut self, launcher: ProcRef) {
        remove_if_same(&mut self.launchers, launcher, |e| e.start_ns);
    }

    /// The launchers in the kernel map: (pid, the entry its children get).
    pub fn launchers(&self) -> Vec<(u32, WatchEntry)> {
        self.launchers.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn watch(
        &mut self,
        process: ProcRef,
        analysis: u64,
        mem_limit: crate::vocab::limits::RssLevels,
    ) -> Result<()> {
        self.start_member_count(analysis)?;
        let there = self.watched.get(&process.pid, 0).ok();
        // A process already counted in this analysis (its sum, its members) stays
        // counted once.
        let counted = there.filter(|e| {
            e.analysis == analysis
                && crate::vocab::process::same_start(e.start_ns, process.start_ns)
        });
        let entry = WatchEntry {
            rss_counted: counted.map_or(0, |e| e.rss_counted),
            ..watch_entry(process, analysis, mem_limit)
        };
        self.watched
            .insert(process.pid, entry, 0)
            .with_context(|| format!("adding pid {} to the kernel's watched map", process.pid))
            .map_err(unavailable)?;
        if counted.is_none() {
            if let Some(replaced) = there {
                self.add_member_base(replaced.analysis, -1);
            }
            self.add_member_base(analysis, 1);
        }
        Ok(())
    }

    /// Removes `process`; false when it was not there (e.g. it exited meanwhile), or its
    /// pid's entry names another process now.
    pub fn unwatch(&mut self, process: ProcRef) -> bool {
        let Some(entry) =
            self.watched.get(&process.pid, 0).ok().filter(|entry| {
                crate::vocab::process::same_start(entry.start_ns, process.start_ns)
            })
        else {
            return false;
        };
        let removed = self.watched.remove(&process.pid).is_ok();
        if removed {
            self.add_member_base(entry.analysis, -1);
        }
        removed
    }

    pub fn is_watched(&self, pid: u32) -> bool {
        self.watched.get(&pid, 0).is_ok()
    }

    /// The kernel's watched set: authoritative, since the programs update it themselves.
    /// Each process with its start time, so nothing taken from here can name a recycled
    /// pid's new process.
    pub fn watched(&self) -> Vec<(ProcRef, u64)> {
        self.watched
            .iter()
            .filter_map(|r| r.ok())
            .map(|(pid, entry)| {
                let process = ProcRef {
                    pid,
                    start_ns: entry.start_ns,
                };
                (process, entry.analysis)
            })
            .collect()
    }

    pub fn watched_capacity(&self) -> u32 {
        self.watched_capacity
    }

    /// The programs' failures so far: (program, kind, count), the ones that happened.
    pub fn program_errors(&self) -> Vec<(&'static str, &'static str, u64)> {
        let Ok(values) = self.errors.iter().collect::<Result<Vec<_>, _>>() else {
            return Vec::new();
        };
        let kinds = PROGRAM_ERRORS.len();
        values
            .iter()
            .enumerate()
            .map(|(slot, per_cpu)| {
                let (program, kind) = (PROGRAM_NAMES[slot / kinds], PROGRAM_ERRORS[slot % kinds]);
                (program, kind, per_cpu.iter().sum::<u64>())
            })
            .filter(|(_, _, count)| *count > 0)
            .collect()
    }

    pub fn lost_events(&self) -> u64 {
        sum_per_cpu(&self.drops)
    }

    pub fn watch_map_full(&self) -> u64 {
        sum_per_cpu(&self.watch_full)
    }
}

/// The pinned task iterators' links, where the kernel runs them.
struct Iters {
    rss: Option<PathBuf>,
    descendants: Option<PathBuf>,
    /// Why the fork refusal is not attached (None: it is).
    lsm_off: Option<String>,
}

impl Kernel {
    /// How the reconcile poll and the registration walk read, as attached.
    fn iterator_paths(&self, config: &watchdog_common::Config) -> [KernelPath; 2] {
        let rss_poll = match (&self.rss_iter, config.rss_enabled != 0) {
            (Some(_), _) => KernelPath::new(
                "rss_poll",
                "task_iterator",
                "one read of a pinned task iterator measures every watched process",
            ),
            (None, true) => KernelPath::new(
                "rss_poll",
                "proc",
                "this kernel refused the task iterator: the poll reads /proc/PID/statm",
            ),
            (None, false) => KernelPath::new(
                "rss_poll",
                "proc",
                "the programs cannot read this kernel's RSS counters: the poll reads /proc/PID/statm",
            ),
        };
        let walk = if self.descendants_iter.is_some() {
            KernelPath::new(
                "registration_walk",
                "task_iterator",
                "a pinned task iterator finds a registered root's descendants",
            )
        } else {
            KernelPath::new(
                "registration_walk",
                "proc_scan",
                "this kernel refused the task iterator: registration scans /proc",
            )
        };
        [rss_poll, walk]
    }

    /// How this kernel lets each part work.
    pub fn paths(&self) -> &[KernelPath] {
        &self.paths
    }
}

/// The running kernel as `uname -r` names it.
pub fn release_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default()
}

/// Sizes the ring buffer and the watched map before the load; returns the watched
/// map's capacity.
fn size_maps(loader: &mut EbpfLoader<'_>, sizes: Sizes, pin_dir: &Path, resumed: bool) -> u32 {
    // A pinned map keeps the size it was made with (another --ring-bytes, or an
    // older default): take it from the pin, or the ring's consumer would read it
    // with the wrong size and mask, i.e. garbage.
    let pinned_size = |name: &str| {
        resumed
            .then(|| aya::maps::MapInfo::from_pin(pin_dir.join(name)).ok())
            .flatten()
            .map(|info| info.max_entries())
    };
    if let Some(bytes) = pinned_size(EVENTS_MAP).or(sizes.ring_bytes) {
        loader.map_max_entries(EVENTS_MAP, bytes);
    }
    let watched_capacity = pinned_size(WATCHED_MAP).unwrap_or(sizes.watched_capacity);
    loader.map_max_entries(WATCHED_MAP, watched_capacity);
    watched_capacity
}

/// The programs a previous daemon left attached keep running: checks they number
/// processes in this daemon's PID namespace and finds their iterators' pins.
fn resume_attached(ebpf: &Ebpf, pid_ns: u32, pin_dir: &Path) -> Result<Iters> {
    check_pinned_pid_ns(ebpf, pid_ns)?;
    tracing::info!(pin_dir = %pin_dir.display(), "programs still attached from the previous run: resuming");
    let pinned = |name| Some(iter_pin(pin_dir, name)).filter(|p| p.exists());
    let lsm_off = (!forks::lsm_pinned(pin_dir))
        .then(|| "the resumed programs run without the task_alloc LSM program".to_string());
    Ok(Iters {
        rss: pinned(RSS_ITER),
        descendants: pinned(DESCENDANTS_ITER),
        lsm_off,
    })
}

/// Attaches and pins the programs and the iterators the kernel can run, then marks
/// the pins as this build's.
fn attach_anew(
    ebpf: &mut Ebpf,
    btf: &Btf,
    config: &watchdog_common::Config,
    pid_ns: u32,
    pin_dir: &Path,
) -> Result<Iters> {
    set_pid_ns(ebpf, btf, config, pid_ns)?;
    attach_and_pin(ebpf, btf, pin_dir)?;
    let lsm_off = forks::attach_lsm(ebpf, btf, pin_dir);
    if let Some(why) = &lsm_off {
        tracing::warn!(
            "forks past --max-processes are not refused in the kernel: {why}; the analysis is killed instead"
        );
    }
    let rss = (config.rss_enabled != 0)
        .then(|| {
            attach_iter(
                ebpf,
                btf,
                pin_dir,
                RSS_ITER,
                "the reconcile poll reads /proc instead",
            )
        })
        .flatten();
    let descendants = attach_iter(
        ebpf,
        btf,
        pin_dir,
        DESCENDANTS_ITER,
        "registration scans /proc for descendants instead",
    );
    // Last: pins without it (a start that did not finish) are not resumed.
    let mut layout: Array<MapData, u64> = Array::try_from(take(ebpf, LAYOUT_MAP)?)?;
    layout
        .set(0, LAYOUT, 0)
        .context("writing this build's layout in the pinned LAYOUT map")?;
    Ok(Iters {
        rss,
        descendants,
        lsm_off,
    })
}

/// Turns the programs' error reports on or off (the switch is pinned: resumed programs
/// follow this daemon), and with them on, takes the reader of their ring.
fn set_kernel_log(ebpf: &mut Ebpf, on: bool) -> Result<Option<KernelLogger>> {
    let mut switch: Array<MapData, u32> = Array::try_from(take(ebpf, KERNEL_LOG_MAP)?)?;
    switch
        .set(0, u32::from(on), 0)
        .context("setting the kernel log switch")?;
    if !on {
        return Ok(None);
    }
    let logger = aya_log::EbpfLogger::init(ebpf)
        .map_err(|e| anyhow!("reading the kernel programs' log ({LOGS_MAP}): {e}"))?;
    tracing::info!("kernel log on: the programs' error reports go to this log");
    Ok(Some(logger))
}

/// Forwards the programs' error reports as they come, to the end. aya-log panics on a
/// record it cannot decode (e.g. one from programs of another aya-log version): then
/// this stops, with a line saying so, and the daemon carries on.
pub async fn forward_kernel_log(logger: KernelLogger) -> Result<()> {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, for its
    // whole life, and the AsyncFd owns the logger.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| anyhow!("registering the kernel log with the reactor: {e}"))?;
    loop {
        let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            logger.get_mut().flush();
        }));
        if flushed.is_err() {
            tracing::error!("a kernel log record could not be decoded: kernel log reading stopped");
            return Ok(());
        }
        let mut guard = logger.readable_mut().await?;
        guard.clear_ready();
    }
}

/// Sizes chosen at load time (a resumed daemon keeps the pinned maps' own), and the
/// daemon's PID namespace (its inode number).
#[derive(Clone, Copy)]
struct Sizes {
    ring_bytes: Option<u32>,
    watched_capacity: u32,
    pid_ns: u32,
    /// RLIMIT_MEMLOCK is below what this kernel charges the maps to it.
    memlock_shortfall: Option<Shortfall>,
}

/// Tells the programs, before they are attached, which PID namespace to number
/// processes in: the daemon's. In the initial one they use the kernel's pids as read
/// and the map is only a record for restarts; in another one its level, which nothing
/// in userspace can tell from inside it, is what the kernel says of the daemon itself.
fn set_pid_ns(
    ebpf: &mut Ebpf,
    btf: &Btf,
    config: &watchdog_common::Config,
    inum: u32,
) -> Result<()> {
    let ns = if config.in_pid_ns == 0 {
        PidNs { level: 0, inum }
    } else {
        let ns = read_own_pid_ns(ebpf, btf).map_err(|e| {
            anyhow!("the daemon runs in a PID namespace of its own (a container without hostPID) and cannot ask the kernel its depth ({e:#}): run it in the host's PID namespace (hostPID), or on a kernel with task iterators (5.8 or newer)")
        })?;
        if ns.inum != inum {
            bail!(
                "the kernel places the daemon in PID namespace {}, and /proc/self/ns/pid says {inum}: the kernel's BTF offsets are wrong; run it in the host's PID namespace (hostPID)",
                ns.inum
            );
        }
        tracing::info!(
            level = ns.level,
            inum,
            "in a PID namespace of its own: the programs report its pids and ignore processes outside it"
        );
        ns
    };
    let map = ebpf
        .map_mut(PID_NS_MAP)
        .with_context(|| format!("map {PID_NS_MAP} missing from the eBPF object"))?;
    Array::<_, PidNs>::try_from(map)?
        .set(0, ns, 0)
        .context("recording the daemon's PID namespace for the programs")
}

/// The PID namespace of the daemon, as the kernel sees it: one read of the pidns
/// iterator, run by this process. The program is unloaded once read.
fn read_own_pid_ns(ebpf: &mut Ebpf, btf: &Btf) -> Result<PidNs> {
    let mut file = start_iter(ebpf, btf, PIDNS_ITER)?.into_file()?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).context("reading the pidns iterator")?;
    drop(file);
    let program: &mut Iter = ebpf
        .program_mut(PIDNS_ITER)
        .context("the pidns iterator vanished")?
        .try_into()?;
    program.unload()?;
    let record = bytes
        .get(..size_of::<PidNs>())
        .context("the pidns iterator wrote nothing (a kernel read was refused)")?;
    // SAFETY: the iterator writes one whole #[repr(C)] PidNs.
    Ok(unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) })
}

/// Pinned programs number processes in the PID namespace they were loaded for: resumed
/// from another one (a new pod on a shared bpffs), every pid they report would name
/// another process, so they are not resumed.
fn check_pinned_pid_ns(ebpf: &Ebpf, inum: u32) -> Result<()> {
    let map = ebpf
        .map(PID_NS_MAP)
        .with_context(|| format!("map {PID_NS_MAP} missing from the eBPF object"))?;
    let pinned = Array::<_, PidNs>::try_from(map)?
        .get(&0, 0)
        .context("reading the pinned PID namespace")?;
    if pinned.inum != inum {
        bail!(
            "the pinned programs number processes in PID namespace {}, and this daemon runs in {inum}",
            pinned.inum
        );
    }
    Ok(())
}

/// The most processes that can live at once on this host: the watched map's capacity.
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(watchdog_common::MAX_WATCHED)
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

fn sum_per_cpu(counter: &PerCpuArray<MapData, u64>) -> u64 {
    counter
        .get(&0, 0)
        .map(|values| values.iter().sum())
        .unwrap_or(0)
}

/// Hands the heap freed since start back to the kernel. Parsing the kernel BTF (ours and
/// aya's) peaks at ~30 MiB that is all free once the programs are loaded, but glibc keeps
/// freed heap mapped (and resident) unless told: without this the idle daemon holds
/// ~20 MiB of nothing.
fn release_free_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The running kernel's (major, minor) version; (0, 0) where it cannot be read, which
/// counts as a kernel that charges RLIMIT_MEMLOCK (the cautious reading).
fn kernel_release() -> (u8, u8) {
    aya::util::KernelVersion::current()
        .map(|v| {
            let code = v.code();
            ((code >> 16) as u8, (code >> 8) as u8)
        })
        .unwrap_or((0, 0))
}

/// What kernels before 5.11 charge for the object's maps at these sizes.
fn maps_charge(watched_capacity: u32, ring_bytes: u32) -> u64 {
    let Ok(object) = aya_obj::Object::parse(PROGRAMS) else {
        return 0;
    };
    let shapes: Vec<MapShape> = object
        .maps
        .iter()
        .map(|(name, map)| MapShape {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: match name.as_str() {
                WATCHED_MAP => watched_capacity,
                EVENTS_MAP => ring_bytes,
                _ => map.max_entries(),
            },
        })
        .collect();
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
    memlock::charge(&shapes, cpus, procfs::page_size())
}

/// One line per part of the watchdog this kernel degrades, and one saying the rest.
fn log_paths(paths: &[KernelPath]) {
    for path in paths {
        if path.how == "poll_only" || path.how == "proc" || path.how == "proc_scan" {
            tracing::warn!(path = %path.path, how = %path.how, "{}", path.detail);
        } else {
            tracing::info!(path = %path.path, how = %path.how, "{}", path.detail);
        }
    }
}

/// The kernel map's entry of `process` in `analysis` (a launcher's: the one its
/// children get, with the launcher's start time).
fn watch_entry(
    process: ProcRef,
    analysis: u64,
    levels: crate::vocab::limits::RssLevels,
) -> WatchEntry {
    WatchEntry {
        analysis,
        mem_limit: levels.limit,
        warn_bytes: levels.warn,
        rss_reported: 0,
        start_ns: process.start_ns,
        rss_counted: 0,
    }
}
