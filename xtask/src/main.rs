//! `cargo xtask setup | build | run | test`: everything a fresh machine needs, in one
//! command each. `run` and `test` call `setup` first, so the README's two commands are
//! the whole set-up.

mod figures;
mod packages;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test watchdog")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the eBPF build needs (idempotent; quick when done).
    Setup,
    /// Set up, then build the daemon (release).
    Build,
    /// Set up, build (release), and start the daemon as root. Arguments after `--` go to
    /// `watchdog-user run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release), and run the benchmarks as root; prints their figures.
    /// Not part of `test`: figures need a quiet machine, not a pass/fail.
    Bench,
    /// Set up, build (release), and install the daemon as a systemd service: the binary
    /// in /usr/local/bin, the unit in /etc/systemd/system, the config in /etc/watchdog
    /// (kept if present). `--destdir` installs under another root (packaging, tests).
    Install {
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
    },
    /// Set up, build, and run the whole test suite as root. Arguments after `--` go to
    /// `cargo test` (e.g. a test name filter).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => toolchain::setup(),
        Cmd::Build => {
            toolchain::setup()?;
            build_daemon(true).map(drop)
        }
        Cmd::Run { args } => {
            toolchain::setup()?;
            let bin = build_daemon(true)?;
            let mut cmd = as_root(&bin);
            cmd.arg("run").args(args);
            step(&format!("starting the daemon: {}", bin.display()));
            run_passing_exit_code(cmd)
        }
        Cmd::Install { destdir } => {
            toolchain::setup()?;
            let bin = build_daemon(true)?;
            install(&bin, &destdir)
        }
        Cmd::Bench => {
            toolchain::setup()?;
            packages::ensure_test_packages()?;
            packages::ensure_psutil()?;
            let bin = build_daemon(true)?;
            bench(&bin)
        }
        Cmd::Test { args } => {
            toolchain::setup()?;
            packages::ensure_test_packages()?;
            packages::ensure_pytest()?;
            let bin = build_daemon(false)?;
            remove_stale_test_pins();
            step("running the test suite (as root: the tests load eBPF programs)");
            let mut cmd = as_root(Path::new("cargo"));
            cmd.current_dir(workspace_root())
                .env("WATCHDOG_BIN", &bin)
                .args(["test", "--"])
                .args(&args);
            let cargo_passed = run_status(cmd)?;
            // A filter names Rust tests: the Python client's suite and the kernel
            // matrix are left out then.
            let matrix_passed = if args.is_empty() {
                kernel_matrix(&bin)?
            } else {
                true
            };
            let python_passed = if args.is_empty() {
                python_client_tests(&bin)?
            } else {
                step(
                    "a test filter was given: the Python client's tests are left out (run them with python3 -m pytest clients/python/tests)",
                );
                true
            };
            let failed: Vec<&str> = [
                (cargo_passed, "cargo test"),
                (matrix_passed, "the kernel matrix"),
                (python_passed, "pytest clients/python/tests"),
            ]
            .into_iter()
            .filter_map(|(passed, what)| (!passed).then_some(what))
            .collect();
            if !failed.is_empty() {
                bail!("failed: {}", failed.join(" and "));
            }
            Ok(())
        }
    }
}

/// The kernel matrix (tests/tests/e2e/kernels.rs): the checks every kernel must pass,
/// in Debian's 5.10, 6.1 and 6.12 under qemu, one kernel at a time (each guest takes
/// both cores). Whether they passed.
fn kernel_matrix(bin: &Path) -> Result<bool> {
    step(
        "running the kernel matrix (Debian 5.10, 6.1, 6.12 under qemu; kernels cached in ~/.cache/watchdog/kernels)",
    );
    let started = std::time::Instant::now();
    let mut cmd = as_root(Path::new("cargo"));
    cmd.current_dir(workspace_root())
        .env("WATCHDOG_BIN", bin)
        .args([
            "test",
            "--package",
            "watchdog-tests",
            "--test",
            "e2e",
            "--",
            "--ignored",
            "kernel_matrix",
            "--test-threads",
            "1",
            "--nocapture",
        ]);
    let passed = run_status(cmd)?;
    step(&format!(
        "the kernel matrix took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(passed)
}

/// The Python client's tests (pytest), against a real daemon (`bin`) as root; they make
/// their own non-root user to drive the client. Whether they passed.
fn python_client_tests(bin: &Path) -> Result<bool> {
    step("running the Python client's tests (pytest clients/python/tests, as root)");
    let mut cmd = as_root(Path::new("python3"));
    cmd.current_dir(workspace_root())
        .env("WATCHDOG_BIN", bin)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args([
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "clients/python/tests",
        ]);
    run_status(cmd)
}

/// Runs every benchmark (each prints its Markdown section), then the targets summary
/// from the figures they recorded, and writes it all to BENCHMARKS.md.
fn bench(bin: &Path) -> Result<()> {
    // A fresh file per run: the summary must hold this run's figures only.
    let figures_path = workspace_root().join("target/bench-figures.txt");
    std::fs::create_dir_all(figures_path.parent().expect("a parent"))?;
    std::fs::write(&figures_path, "")?;
    let mut report = String::from(
        "# Benchmarks\n\nProduced by `cargo xtask bench` (release build, as root), every figure measured in the same run on the same machine.\n\n",
    );
    let uname = Command::new("uname").arg("-srm").output()?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    report.push_str(&format!(
        "Machine: {}, {cores} cores ({cpu}), {}.\n\n",
        String::from_utf8_lossy(&uname.stdout).trim(),
        humantime_now()
    ));
    for bench in [
        "bench-latency",
        "bench-forks",
        "bench-overhead",
        "bench-store",
        "bench-register",
        "bench-scale",
        "bench-page",
        "bench-kill",
        "bench-bounds",
    ] {
        step(&format!("running {bench}"));
        let mut cmd = as_root(Path::new("cargo"));
        cmd.current_dir(workspace_root())
            .env("WATCHDOG_BIN", bin)
            .env(figures::ENV, &figures_path)
            .args([
                "run",
                "--quiet",
                "--release",
                "--package",
                "watchdog-bench",
                "--bin",
                bench,
            ]);
        let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
        if !out.status.success() {
            bail!("{bench} failed ({})", out.status);
        }
        let section = String::from_utf8_lossy(&out.stdout);
        print!("{section}");
        report.push_str(&section);
        report.push('\n');
    }
    let summary = figures::summary(&figures::Figures::read(&figures_path));
    println!("\n{summary}");
    report.push_str(&summary);
    let path = workspace_root().join("BENCHMARKS.md");
    std::fs::write(&path, report)?;
    step(&format!("wrote {}", path.display()));
    Ok(())
}

fn humantime_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn install(bin: &Path, destdir: &Path) -> Result<()> {
    let root = workspace_root();
    let place = |from: &Path, to: &str, keep_existing: bool| -> Result<()> {
        let to = destdir.join(to.trim_start_matches('/'));
        if keep_existing && to.exists() {
            step(&format!("keeping the existing {}", to.display()));
            return Ok(());
        }
        std::fs::create_dir_all(to.parent().expect("a file"))?;
        std::fs::copy(from, &to).with_context(|| format!("installing {}", to.display()))?;
        step(&format!("installed {}", to.display()));
        Ok(())
    };
    place(bin, "/usr/local/bin/watchdog-user", false)?;
    place(
        &root.join("deploy/watchdog.service"),
        "/etc/systemd/system/watchdog.service",
        false,
    )?;
    place(
        &root.join("deploy/watchdog.toml"),
        "/etc/watchdog/watchdog.toml",
        true,
    )?;
    if destdir == Path::new("/") {
        ensure_socket_group()?;
    }
    if destdir == Path::new("/") && Path::new("/run/systemd/system").exists() {
        run_checked({
            let mut cmd = Command::new("systemctl");
            cmd.arg("daemon-reload");
            cmd
        })?;
        step("start it with: systemctl enable --now watchdog");
    } else {
        step(
            "systemd is not running here: start the service where it is (systemctl enable --now watchdog)",
        );
    }
    Ok(())
}

/// The socket's group (`watchdog`, the daemon's default --socket-group): its members may
/// use the watchdog for their own processes. Created when missing; without it the
/// socket stays root-only.
fn ensure_socket_group() -> Result<()> {
    const GROUP: &str = "watchdog";
    let exists = Command::new("getent")
        .args(["group", GROUP])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if exists {
        step(&format!("keeping the existing group {GROUP}"));
    } else {
        run_checked({
            let mut cmd = Command::new("groupadd");
            cmd.args(["--system", GROUP]);
            cmd
        })?;
        step(&format!("created the group {GROUP}"));
    }
    step(&format!(
        "users in group {GROUP} may watch their own processes: usermod -aG {GROUP} USER"
    ));
    Ok(())
}

/// Tests pin their kernel state under /sys/fs/bpf/watchdog-test-*, and remove it when
/// they end; a run that was killed leaves programs attached. Machines are reused, so
/// no run inherits them.
fn remove_stale_test_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("watchdog-test-")
        {
            step(&format!(
                "removing stale test pins {}",
                entry.path().display()
            ));
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Prints a step of a long-running command, so a person watching knows what it waits on.
pub fn step(what: &str) {
    eprintln!("xtask: {what}");
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// PATH with the directory `setup` installs bpf-linker into first, so the nested eBPF
/// build finds it even where CARGO_HOME/bin is not on the caller's PATH.
fn path_with_linker() -> std::ffi::OsString {
    let mut dirs = vec![toolchain::cargo_home().join("bin")];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).expect("PATH entries have no ':'")
}

fn build_daemon(release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    step(&format!(
        "building watchdog-user ({profile}; the eBPF programs are built with it)"
    ));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env("PATH", path_with_linker())
        .args(["build", "--package", "watchdog-user"]);
    if release {
        cmd.arg("--release");
    }
    run_checked(cmd)?;
    Ok(workspace_root()
        .join("target")
        .join(profile)
        .join("watchdog-user"))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A command that runs as root: directly when we are root, through sudo otherwise
/// (keeping PATH so cargo, rustup and bpf-linker are found).
fn as_root(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new(program);
        cmd.env("PATH", path_with_linker());
        return cmd;
    }
    let mut cmd = Command::new("sudo");
    cmd.arg("--preserve-env")
        .arg(format!("PATH={}", path_with_linker().to_string_lossy()))
        .arg(program);
    cmd
}

pub fn run_checked(mut cmd: Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` to its end: whether it succeeded.
fn run_status(mut cmd: Command) -> Result<bool> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    Ok(status.success())
}

fn run_passing_exit_code(mut cmd: Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    std::process::exit(status.code().unwrap_or(1));
}
