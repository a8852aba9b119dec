//! The kernel matrix: the checks every kernel must pass, run inside Debian's own 5.10,
//! 6.1 and 6.12 kernels booted under qemu with this machine's userspace (read-only, a
//! RAM overlay on top: the guest runs this very test binary and daemon).
//! `tests/kernels/get-kernels.sh` fetches the kernel packages through apt once into
//! the cache (`WATCHDOG_KERNELS`, default `~/.cache/watchdog/kernels`);
//! `tests/kernels/run-in-kernel.sh` boots one. Each boot takes minutes under TCG, so
//! these are left out of a plain `cargo test`; `cargo xtask test` runs them after the
//! suite (`cargo test --test e2e -- --ignored kernel_matrix`).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use watchdog_tests::watchdog_bin;

/// What must hold on every kernel, each an end-to-end test of this binary.
const CHECKS: &[&str] = &[
    "enforce::a_timeout_sigterms_at_the_deadline_and_sigkills_what_ignores_it_after_the_grace",
    "enforce::a_process_over_its_memory_limit_is_killed_by_the_kernel_fast_path_not_the_poll",
    "warnings::a_script_trapping_the_warning_checkpoints_before_its_memory_kill",
    "enforce::an_analysis_root_whose_launcher_dies_is_flagged_orphan_and_killed",
    "tree::a_process_whose_main_thread_exits_first_leaves_the_tree_only_with_its_last_thread",
    "recover::a_crashed_daemon_restarts_with_every_gap_fork_watched_and_acts_on_the_gap",
    "tree::a_daemon_in_its_own_pid_namespace_kills_a_timed_out_tree_started_there",
    "refuse::a_fork_storm_from_several_members_is_refused_at_exactly_max_processes_and_nothing_is_killed",
    "refuse::forks_refused_while_the_daemon_is_stopped_are_recorded_once_after_sigcont_and_a_restart",
];

/// The guests' kernel command line: the BPF LSM active, for the fork refusal.
const GUEST_APPEND: &str = "lsm=capability,bpf";

/// One fetch at a time: the script fetches all three kernels.
static FETCH: Mutex<()> = Mutex::new(());

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

fn cache() -> PathBuf {
    std::env::var_os("WATCHDOG_KERNELS").map_or_else(
        || {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/watchdog/kernels")
        },
        PathBuf::from,
    )
}

/// The cached package of Debian's `line` kernel (e.g. `5.10.`), fetched if missing.
fn kernel_package(line: &str) -> Result<PathBuf> {
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache();
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&format!("linux-image-{line}")) && n.ends_with(".deb")
                })
            })
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    let out = Command::new(scripts().join("get-kernels.sh"))
        .arg(&dir)
        .output()
        .context("running tests/kernels/get-kernels.sh")?;
    if !out.status.success() {
        bail!(
            "fetching the Debian kernels failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    find().with_context(|| {
        format!(
            "get-kernels.sh fetched no linux-image-{line}* into {}",
            dir.display()
        )
    })
}

/// Set in the guests: a test there runs as it is, never in another guest.
pub const IN_GUEST: &str = "WATCHDOG_IN_GUEST";

/// Boots Debian's `line` kernel and runs every check in it; fails with the guest's
/// output when one fails.
fn checks_pass_in(line: &str) -> Result<()> {
    run_in_kernel(line, CHECKS)
}

/// Boots Debian's `line` kernel (the BPF LSM active) and runs `checks` of this binary
/// in it; fails with the guest's output when one fails.
pub fn run_in_kernel(line: &str, checks: &[&str]) -> Result<()> {
    let package = kernel_package(line)?;
    let started = Instant::now();
    let out = Command::new(scripts().join("run-in-kernel.sh"))
        .env("RIK_TIMEOUT", "900")
        .env("RIK_MEM", "3G")
        .env("RIK_CACHE", cache().join("extracted"))
        .env("RIK_APPEND", GUEST_APPEND)
        .arg(&package)
        .arg("env")
        .arg(format!("WATCHDOG_BIN={}", watchdog_bin().display()))
        .arg(format!("{IN_GUEST}=1"))
        .arg(std::env::current_exe()?)
        .args(["--exact", "--test-threads", "1", "--show-output"])
        .args(checks)
        .output()
        .context("running tests/kernels/run-in-kernel.sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| {
            l.starts_with("test ") || l.starts_with("figures:") || l.starts_with("test result")
        })
        .collect();
    eprintln!(
        "kernel {} ({:.0} s, boot included):\n  {}",
        package.display(),
        started.elapsed().as_secs_f64(),
        said.join("\n  ")
    );
    if !out.status.success() {
        bail!(
            "the checks failed in {} ({}):\n{stdout}\n--- stderr ---\n{stderr}",
            package.display(),
            out.status
        );
    }
    let passed = said.iter().filter(|l| l.ends_with("... ok")).count();
    if passed != checks.len() {
        bail!(
            "{passed} of {} checks passed in {}:\n{stdout}",
            checks.len(),
            package.display()
        );
    }
    Ok(())
}

#[test]
#[ignore = "boots Debian's 5.10 under qemu: cargo xtask test runs it after the suite"]
fn kernel_matrix_debian_5_10() -> Result<()> {
    checks_pass_in("5.10.")
}

#[test]
#[ignore = "boots Debian's 6.1 under qemu: cargo xtask test runs it after the suite"]
fn kernel_matrix_debian_6_1() -> Result<()> {
    checks_pass_in("6.1.")
}

#[test]
#[ignore = "boots Debian's 6.12 under qemu: cargo xtask test runs it after the suite"]
fn kernel_matrix_debian_6_12() -> Result<()> {
    checks_pass_in("6.12.")
}
