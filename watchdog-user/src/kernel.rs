//! Loads and attaches the kernel programs, and wraps the maps the daemon shares with them.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, links::FdLink},
};
use watchdog_common::{
    ANALYSES_MAP, AnalysisEntry, CONFIG_GLOBAL, DROPS_MAP, EVENTS_MAP, ROOTS_MAP, RootEntry,
    WATCH_FULL_MAP, WATCHED_MAP, WatchEntry,
};

use crate::btf::KernelBtf;

/// The object built by watchdog-user's build.rs from watchdog-ebpf.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watchdog"));

/// The tracepoints we attach to, each by a program of the same name.
const TRACEPOINTS: [&str; 4] = [
    "sched_process_fork",
    "sched_process_exit",
    "sched_process_exec",
    "rss_stat",
];

pub struct Kernel {
    /// Owns the loaded object; the links are pinned, so they outlive it.
    _ebpf: Ebpf,
    watched: HashMap<MapData, u32, WatchEntry>,
    drops: PerCpuArray<MapData, u64>,
    watch_full: PerCpuArray<MapData, u64>,
    analyses: HashMap<MapData, u64, AnalysisEntry>,
    roots: HashMap<MapData, u32, RootEntry>,
    resumed: bool,
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
fn refused(what: &str, err: impl Into<anyhow::Error>) -> anyhow::Error {
    let err = err.into();
    let chain = format!("{err:#}");
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

/// The maps pinned under the pin directory, by name.
const PINNED_MAPS: [&str; 6] = [
    WATCHED_MAP,
    EVENTS_MAP,
    DROPS_MAP,
    WATCH_FULL_MAP,
    ANALYSES_MAP,
    ROOTS_MAP,
];

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
        nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 as i64 == BPF_FS_MAGIC)
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
    pub fn load(
        btf_path: &Path,
        ring_bytes: Option<u32>,
        pin_dir: &Path,
        fresh: bool,
    ) -> Result<(Self, RingBuf<MapData>)> {
        let config = KernelBtf::from_file(btf_path)?.program_config()?;
        tracing::debug!(?config, "offsets read from kernel BTF");
        // EbpfLoader::new() parses /sys/kernel/btf/vmlinux for itself (~15 MiB of heap);
        // it is given ours (from --btf) instead, so drop its copy before parsing ours:
        // one parsed BTF alive at a time, not two.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let btf = Btf::parse_file(btf_path, Endianness::default())
            .map_err(|e| anyhow!("kernel BTF at {} is unusable: {e}", btf_path.display()))?;
        raise_memlock_limit();
        if fresh || !programs_pinned(pin_dir) {
            // Partial pins (a crash mid-start) are not worth trusting.
            drop_pins(pin_dir)?;
        }
        ensure_bpffs(pin_dir).map_err(|e| refused("pin its maps", e))?;
        let resumed = programs_pinned(pin_dir);
        let loaded = Self::load_pinned(loader, &btf, &config, ring_bytes, pin_dir, resumed);
        if loaded.is_err() && !resumed {
            // Refused: leave no half-made pinned state behind.
            let _ = drop_pins(pin_dir);
        }
        drop(btf);
        release_free_heap();
        loaded
    }

    fn load_pinned<'a>(
        mut loader: EbpfLoader<'a>,
        btf: &'a Btf,
        config: &'a watchdog_common::Config,
        ring_bytes: Option<u32>,
        pin_dir: &Path,
        resumed: bool,
    ) -> Result<(Self, RingBuf<MapData>)> {
        loader
            .btf(Some(btf))
            .override_global(CONFIG_GLOBAL, config, true);
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        // A pinned ring keeps the size it was made with (another --ring-bytes, or an
        // older default): take it from the pin, or the consumer would read it with the
        // wrong size and mask, i.e. garbage.
        let pinned_ring = resumed
            .then(|| aya::maps::MapInfo::from_pin(pin_dir.join(EVENTS_MAP)).ok())
            .flatten()
            .map(|info| info.max_entries());
        if let Some(bytes) = pinned_ring.or(ring_bytes) {
            loader.map_max_entries(EVENTS_MAP, bytes);
        }
        let mut ebpf = loader
            .load(PROGRAMS)
            .map_err(|e| refused("load the watchdog's eBPF maps and programs", e))?;
        if resumed {
            tracing::info!(pin_dir = %pin_dir.display(), "programs still attached from the previous run: resuming");
        } else {
            attach_and_pin(&mut ebpf, btf, pin_dir)?;
        }
        let ring = RingBuf::try_from(take(&mut ebpf, EVENTS_MAP)?)?;
        let kernel = Self {
            watched: HashMap::try_from(take(&mut ebpf, WATCHED_MAP)?)?,
            drops: PerCpuArray::try_from(take(&mut ebpf, DROPS_MAP)?)?,
            watch_full: PerCpuArray::try_from(take(&mut ebpf, WATCH_FULL_MAP)?)?,
            analyses: HashMap::try_from(take(&mut ebpf, ANALYSES_MAP)?)?,
            roots: HashMap::try_from(take(&mut ebpf, ROOTS_MAP)?)?,
            resumed,
            _ebpf: ebpf,
        };
        Ok((kernel, ring))
    }

    /// Whether this daemon took over programs a previous one left attached.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    pub fn save_analysis(&mut self, key: u64, entry: &AnalysisEntry) -> Result<()> {
        self.analyses
            .insert(key, entry, 0)
            .context("saving the analysis in the kernel map")
    }

    pub fn forget_analysis(&mut self, key: u64) {
        let _ = self.analyses.remove(&key);
        let roots: Vec<u32> = self
            .roots()
            .into_iter()
            .filter(|(_, r)| r.analysis == key)
            .map(|(pid, _)| pid)
            .collect();
        for pid in roots {
            let _ = self.roots.remove(&pid);
        }
    }

    pub fn saved_analyses(&self) -> Vec<(u64, AnalysisEntry)> {
        self.analyses.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn save_root(&mut self, pid: u32, entry: &RootEntry) -> Result<()> {
        self.roots
            .insert(pid, entry, 0)
            .context("saving the root in the kernel map")
    }

    pub fn roots(&self) -> Vec<(u32, RootEntry)> {
        self.roots.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn watch(&mut self, pid: u32, analysis: u64, mem_limit: u64) -> Result<()> {
        self.watched
            .insert(
                pid,
                WatchEntry {
                    analysis,
                    mem_limit,
                    rss_reported: 0,
                },
                0,
            )
            .with_context(|| format!("adding pid {pid} to the kernel's watched map"))
    }

    /// Removes `pid`; false when it was not there (e.g. it exited meanwhile).
    pub fn unwatch(&mut self, pid: u32) -> bool {
        self.watched.remove(&pid).is_ok()
    }

    pub fn is_watched(&self, pid: u32) -> bool {
        self.watched.get(&pid, 0).is_ok()
    }

    /// The kernel's watched set: authoritative, since the programs update it themselves.
    pub fn watched(&self) -> Vec<(u32, u64)> {
        self.watched
            .iter()
            .filter_map(|r| r.ok())
            .map(|(pid, entry)| (pid, entry.analysis))
            .collect()
    }

    pub fn lost_events(&self) -> u64 {
        sum_per_cpu(&self.drops)
    }

    pub fn watch_map_full(&self) -> u64 {
        sum_per_cpu(&self.watch_full)
    }
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

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Newer ones charge the memory
/// cgroup, and where we lack CAP_SYS_RESOURCE the raise fails harmlessly.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(errno) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!("could not raise RLIMIT_MEMLOCK ({errno}); fine on kernels >= 5.11");
    }
}
