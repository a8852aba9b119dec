//! Forks refused in the kernel: the BPF LSM's `task_alloc` program fails a fork that
//! would take an analysis past its process limit, from a member count the programs and
//! the daemon keep between them (`MEMBERS`: the programs' part; `FORK_LIMITS`: the
//! limit and the daemon's part, each written by one side only, so neither needs the
//! other's atomics).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Btf, Ebpf,
    programs::{Lsm, links::FdLink},
};
use watchdog_common::{ForkLimit, Members, REFUSAL_BURST_GAP_NS};

use crate::{core::rules::forks::RefusalBurst, kernel::Kernel, vocab::kernel::KernelPath};

/// The LSM hooks we attach to, each by a program of the same name: `task_alloc`
/// refuses and counts ahead, `task_free` takes back a fork that failed after it.
pub(super) const LSM_HOOKS: [&str; 2] = ["task_alloc", "task_free"];

/// Where the active LSMs are listed (securityfs).
const ACTIVE_LSMS: &str = "/sys/kernel/security/lsm";

pub(super) fn lsm_link_pin(pin_dir: &Path, hook: &str) -> PathBuf {
    pin_dir.join(format!("link_lsm_{hook}"))
}

/// Whether a previous daemon left the fork refusal attached.
pub(super) fn lsm_pinned(pin_dir: &Path) -> bool {
    LSM_HOOKS
        .iter()
        .all(|hook| lsm_link_pin(pin_dir, hook).exists())
}

/// Why the running kernel cannot refuse forks, if it cannot: the BPF LSM is not among
/// the active LSMs (securityfs is mounted for the look if it is not).
fn bpf_lsm_inactive() -> Option<String> {
    let read = || std::fs::read_to_string(ACTIVE_LSMS);
    let listed = read().or_else(|_| {
        nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(std::io::Error::from)?;
        read()
    });
    match listed {
        Err(err) => Some(format!(
            "the active LSMs cannot be read at {ACTIVE_LSMS} ({err})"
        )),
        Ok(list) if list.trim().split(',').any(|lsm| lsm == "bpf") => None,
        Ok(list) => Some(format!(
            "the BPF LSM is not active (active: {}): boot with lsm={},bpf",
            list.trim(),
            list.trim()
        )),
    }
}

/// Loads, attaches and pins the fork refusal where the kernel lets it run; otherwise
/// the reason, and nothing of it is attached.
pub(super) fn attach_lsm(ebpf: &mut Ebpf, btf: &Btf, pin_dir: &Path) -> Option<String> {
    if let Some(why) = bpf_lsm_inactive() {
        return Some(why);
    }
    let mut attach = |hook: &str| -> Result<()> {
        let program: &mut Lsm = ebpf
            .program_mut(hook)
            .with_context(|| format!("program {hook} missing from the eBPF object"))?
            .try_into()?;
        program
            .load(hook, btf)
            .map_err(|e| anyhow!("loading the {hook} LSM program: {e:?}"))?;
        let link_id = program.attach()?;
        let link: FdLink = program.take_link(link_id)?.into();
        link.pin(lsm_link_pin(pin_dir, hook))?;
        Ok(())
    };
    let attached = LSM_HOOKS.iter().try_for_each(|hook| attach(hook));
    attached.err().map(|err| {
        for hook in LSM_HOOKS {
            let _ = std::fs::remove_file(lsm_link_pin(pin_dir, hook));
        }
        format!("the kernel refused the task_alloc LSM program ({err:#})")
    })
}

impl Kernel {
    /// The fork refusal's way on this kernel, with `lsm_off` the reason it cannot be
    /// attached (None: attached).
    pub(super) fn fork_path(lsm_off: Option<&str>, off: Option<&str>) -> KernelPath {
        match (lsm_off, off) {
            (Some(why), _) => KernelPath::new(
                "fork_limit",
                "kill",
                format!("{why}: an analysis past --max-processes is killed"),
            ),
            (None, Some(why)) => KernelPath::new("fork_limit", "kill", why),
            (None, None) => KernelPath::new(
                "fork_limit",
                "refuse",
                "the task_alloc LSM program fails a fork past --max-processes with EAGAIN",
            ),
        }
    }

    /// Whether forks past an analysis' limit are refused in the kernel now.
    pub fn refuses_forks(&self) -> bool {
        self.paths
            .iter()
            .any(|p| p.path == "fork_limit" && p.how == "refuse")
    }

    /// Turns the fork refusal on (`off` None) or off, saying why; off where the kernel
    /// cannot run it.
    pub fn set_fork_refusal(&mut self, off: Option<&str>) -> Result<()> {
        let path = Self::fork_path(self.lsm_off.as_deref(), off);
        let on = path.how == "refuse";
        self.set_strike(watchdog_common::STRIKE_FORKS, on)?;
        self.paths.retain(|p| p.path != path.path);
        self.paths.push(path);
        Ok(())
    }

    /// Makes analysis `key`'s member count, before its first process enters the
    /// watched map, so that no fork of one goes uncounted.
    pub(super) fn start_member_count(&mut self, key: u64) -> Result<()> {
        if self.members.get(&key, 0).is_err() {
            self.members
                .insert(key, Members::default(), 0)
                .context("starting the analysis' member count in the kernel map")?;
        }
        Ok(())
    }

    /// Moves the daemon's part of `key`'s member count by `delta`.
    pub(super) fn add_member_base(&mut self, key: u64, delta: i64) {
        let mut limit = self.fork_limits.get(&key, 0).unwrap_or_default();
        limit.base = limit.base.wrapping_add(delta as u64);
        if let Err(err) = self.fork_limits.insert(key, limit, 0) {
            tracing::error!(
                "counting a member in the kernel map failed ({err}): the fork limit counts wrong for analysis {key}"
            );
        }
    }

    /// Sets `key`'s process limit for the kernel (0: none), keeping its count.
    pub(super) fn set_fork_limit(&mut self, key: u64, max: u64) -> Result<()> {
        self.start_member_count(key)?;
        let limit = ForkLimit {
            max,
            ..self.fork_limits.get(&key, 0).unwrap_or_default()
        };
        self.fork_limits
            .insert(key, limit, 0)
            .context("setting the analysis' process limit in the kernel map")
    }

    pub(super) fn forget_member_count(&mut self, key: u64) {
        let _ = self.members.remove(&key);
        let _ = self.fork_limits.remove(&key);
    }

    /// `key`'s members as the kernel counts them: the programs' part and the daemon's.
    pub fn member_count(&self, key: u64) -> Option<i64> {
        let members = self.members.get(&key, 0).ok()?;
        let base = self.fork_limits.get(&key, 0).unwrap_or_default().base;
        Some(members.kernel.wrapping_add(base) as i64)
    }

    /// The bursts of refused forks not recorded yet that are over (no refusal for
    /// [`REFUSAL_BURST_GAP_NS`] before `now_ns`, CLOCK_BOOTTIME), and whether one is
    /// still going on.
    pub fn refusal_bursts(&self, now_ns: u64) -> (Vec<RefusalBurst>, bool) {
        let mut going_on = false;
        let mut over = Vec::new();
        for (analysis, members) in self.members.iter().filter_map(|entry| entry.ok()) {
            let Ok(limit) = self.fork_limits.get(&analysis, 0) else {
                continue;
            };
            if members.refused <= limit.recorded {
                continue;
            }
            if now_ns.saturating_sub(members.last_refused_ns) < REFUSAL_BURST_GAP_NS {
                going_on = true;
                continue;
            }
            over.push(RefusalBurst {
                analysis,
                refused: members.refused - limit.recorded,
                pid: members.burst_pid,
                first_ns: members.burst_start_ns,
                total: members.refused,
            });
        }
        (over, going_on)
    }

    /// A burst's refusals are in a record: none of them is recorded again, also by a
    /// restarted daemon.
    pub fn refusals_recorded(&mut self, analysis: u64, total: u64) {
        let Ok(mut limit) = self.fork_limits.get(&analysis, 0) else {
            return;
        };
        limit.recorded = total;
        if let Err(err) = self.fork_limits.insert(analysis, limit, 0) {
            tracing::error!(
                "{}",
                anyhow!(
                    "noting refused forks as recorded failed ({err}): a restarted daemon records them again"
                )
            );
        }
    }
}
