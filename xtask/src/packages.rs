//! Packages the test suite needs and a fresh machine may lack: the PostgreSQL server (the
//! persistence tests start their own throwaway one), pytest (the Python client's tests).

use std::process::Command;

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
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian's {} (a throwaway database server for the persistence tests; \
         systemd-analyze to verify the unit)",
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
    let has = Command::new("python3")
        .args(["-c", "import psutil"])
        .status()
        .is_ok_and(|s| s.success());
    if has {
        return Ok(());
    }
    step("installing psutil (PyPI) for the reference poller");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "install", "-q", "psutil"]);
    run_checked(cmd)
}

/// The Python client's tests (clients/python/tests) run on pytest, from PyPI; installed
/// for the Python that runs them (root's, through sudo when not root).
pub fn ensure_pytest() -> Result<()> {
    let python = || {
        if nix::unistd::geteuid().is_root() {
            Command::new("python3")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("--preserve-env=PATH").arg("python3");
            sudo
        }
    };
    let has = python()
        .args(["-c", "import pytest"])
        .status()
        .is_ok_and(|s| s.success());
    if has {
        return Ok(());
    }
    step("installing pytest (PyPI) for the Python client's tests");
    let mut cmd = python();
    cmd.args(["-m", "pip", "install", "-q", "pytest"]);
    run_checked(cmd)
}
