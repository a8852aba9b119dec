//! Loads and attaches the kernel programs, and wraps the maps the daemon shares with them.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use watchdog_common::{
    CONFIG_GLOBAL, DROPS_MAP, EVENTS_MAP, WATCH_FULL_MAP, WATCHED_MAP, WatchEntry,
};

use crate::btf::KernelBtf;

/// The object built by watchdog-user's build.rs from watchdog-ebpf.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watchdog"));

/// The tracepoints we attach to, each by a program of the same name.
const TRACEPOINTS: [&str; 4] = ["sched_process_fork", "sched_process_exit", "sched_process_exec", "rss_stat"];

pub struct Kernel {
    /// Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    watched: HashMap<MapData, u32, WatchEntry>,
    drops: PerCpuArray<MapData, u64>,
    watch_full: PerCpuArray<MapData, u64>,
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

impl Kernel {
    /// Loads the programs with this kernel's struct offsets and attaches them.
    /// Returns the kernel handle and the ring buffer for [`crate::ingest`].
    /// `ring_bytes` overrides the ring buffer's size (a power of two, at least a page).
    pub fn load(btf_path: &Path, ring_bytes: Option<u32>) -> Result<(Self, RingBuf<MapData>)> {
        let config = KernelBtf::from_file(btf_path)?.program_config()?;
        tracing::debug!(?config, "offsets read from kernel BTF");
        let btf = Btf::parse_file(btf_path, Endianness::default())
            .map_err(|e| anyhow!("kernel BTF at {} is unusable: {e}", btf_path.display()))?;
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader.btf(Some(&btf)).override_global(CONFIG_GLOBAL, &config, true);
        if let Some(bytes) = ring_bytes {
            loader.map_max_entries(EVENTS_MAP, bytes);
        }
        let mut ebpf = loader
            .load(PROGRAMS)
            .map_err(|e| refused("load the watchdog's eBPF maps and programs", e))?;
        for tracepoint in TRACEPOINTS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(tracepoint)
                .with_context(|| format!("program {tracepoint} missing from the eBPF object"))?
                .try_into()?;
            program
                .load(tracepoint, &btf)
                .map_err(|e| refused(&format!("verify the {tracepoint} program"), e))?;
            program
                .attach()
                .map_err(|e| refused(&format!("attach to tracepoint {tracepoint}"), e))?;
        }
        let ring = RingBuf::try_from(take(&mut ebpf, EVENTS_MAP)?)?;
        let kernel = Self {
            watched: HashMap::try_from(take(&mut ebpf, WATCHED_MAP)?)?,
            drops: PerCpuArray::try_from(take(&mut ebpf, DROPS_MAP)?)?,
            watch_full: PerCpuArray::try_from(take(&mut ebpf, WATCH_FULL_MAP)?)?,
            _ebpf: ebpf,
        };
        Ok((kernel, ring))
    }

    pub fn watch(&mut self, pid: u32, analysis: u64, mem_limit: u64) -> Result<()> {
        self.watched
            .insert(pid, WatchEntry { analysis, mem_limit, rss_reported: 0 }, 0)
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

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Newer ones charge the memory
/// cgroup, and where we lack CAP_SYS_RESOURCE the raise fails harmlessly.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(errno) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!("could not raise RLIMIT_MEMLOCK ({errno}); fine on kernels >= 5.11");
    }
}
