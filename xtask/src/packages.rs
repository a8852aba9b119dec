//! System packages the test suite needs and a fresh machine may lack: the PostgreSQL
//! server (the persistence tests start their own throwaway one).

use std::process::Command;

use anyhow::Result;

use crate::{run_checked, step};

fn postgres_server_installed() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|versions| versions.filter_map(|v| v.ok()).any(|v| v.path().join("bin/initdb").exists()))
        .unwrap_or(false)
}

pub fn ensure_test_packages() -> Result<()> {
    if postgres_server_installed() {
        return Ok(());
    }
    step("installing Debian's postgresql package (the persistence tests run a throwaway server)");
    let apt = |args: &[&str]| {
        let mut cmd = if nix::unistd::geteuid().is_root() { Command::new("apt-get") } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_checked(apt(&["update", "-q"]))?;
    run_checked(apt(&["install", "-y", "-q", "--no-install-recommends", "postgresql"]))?;
    anyhow::ensure!(
        postgres_server_installed(),
        "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
    );
    Ok(())
}
