//! Packages the test suite needs and a fresh machine may lack: the PostgreSQL server (the
//! persistence tests start their own throwaway one), systemd-nspawn (the unit's test boots
//! a real systemd in a container), chromium (the live page's test drives it headless),
//! pytest (the Python client's tests).

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::{run_checked, step};

fn postgres_server_installed() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|versions| {
            versions
                .filter_map(|v| v.ok())
                .any(|v| v.path().join("bin/initdb").exists())
        })
        .unwrap_or(false)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).exists()))
}

pub fn ensure_test_packages() -> Result<()> {
    let mut missing = Vec::new();
    if !postgres_server_installed() {
        missing.push("postgresql");
    }
    if !on_path("systemd-analyze") {
        missing.push("systemd");
    }
    if !on_path("systemd-nspawn") {
        missing.push("systemd-container");
    }
    // tests/tests/e2e/page.rs starts this very path.
    if !Path::new("/usr/bin/chromium").exists() {
        missing.push("chromium");
    }
    // The kernel matrix (tests/kernels/run-in-kernel.sh): qemu boots Debian's kernels
    // with an initramfs of busybox and the modules kmod lists, packed by cpio.
    for (binary, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("cpio", "cpio"),
        ("depmod", "kmod"),
    ] {
        if !on_path(binary) && !Path::new("/sbin").join(binary).exists() {
            missing.push(package);
        }
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian's {} (a throwaway database server for the persistence tests; \
         systemd-analyze to verify the unit; systemd-nspawn to run it under a real systemd; \
         a headless browser for the live page's test; qemu, busybox, kmod and cpio to boot \
         other kernels for the kernel matrix)",
        missing.join(" and ")
    ));
    let apt = |args: &[&str]| {
        let mut cmd = if nix::unistd::geteuid().is_root() {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_checked(apt(&["update", "-q"]))?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    run_checked(apt(&install))?;
    anyhow::ensure!(
        postgres_server_installed(),
        "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
    );
    Ok(())
}

/// The reference poller (bench/poller.py) runs on psutil, from PyPI.
pub fn ensure_psutil() -> Result<()> {
    ensure_python_module(|| Command::new("python3"), "psutil", "the reference poller")
}

/// The Python client's tests (clients/python/tests) run on pytest, from PyPI; checked
/// and installed with the very command that runs them (root's Python, through sudo
/// when not root).
pub fn ensure_pytest() -> Result<()> {
    ensure_python_module(
        || crate::as_root(Path::new("python3")),
        "pytest",
        "the Python client's tests",
    )
}

/// Installs `module` from PyPI with pip unless the Python that `python` starts can
/// already import it.
fn ensure_python_module(python: impl Fn() -> Command, module: &str, for_what: &str) -> Result<()> {
    let has = python()
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if has {
        return Ok(());
    }
    step(&format!("installing {module} (PyPI) for {for_what}"));
    let mut cmd = python();
    cmd.args(["-m", "pip", "install", "-q", module]);
    run_checked(cmd)
}
