//! The eBPF toolchain, installed the way `shared/ebpf-toolchain.md` proved works here:
//! a nightly with rust-src (aya-build compiles the kernel crate with `-Z build-std=core`)
//! and a bpf-linker linked against that very nightly's libLLVM, because a bpf-linker
//! whose LLVM is older than the compiler's cannot read its bitcode, and Debian has no
//! LLVM new enough to build one against.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{run_checked, step};

/// The toolchain aya-build's `Toolchain::Nightly` runs (`rustup run nightly ...`).
const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    ensure_nightly_with_rust_src()?;
    ensure_bpf_linker()
}

fn ensure_nightly_with_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly-")) {
        step("installing the nightly toolchain with rust-src (needed to build eBPF)");
        return run_checked(rustup(&[
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "-c",
            "rust-src",
        ]));
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain");
        run_checked(rustup(&[
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

fn rustup(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(args);
    cmd
}

/// What the nightly compiler says of itself: the bpf-linker is rebuilt whenever this
/// changes, since its LLVM must match the compiler's.
struct Nightly {
    version_text: String,
    llvm_major: String,
    sysroot: PathBuf,
}

fn nightly() -> Result<Nightly> {
    let version_text = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let llvm = version_text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let llvm_major = llvm.split('.').next().unwrap_or_default().to_string();
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    Ok(Nightly {
        version_text,
        llvm_major,
        sysroot: PathBuf::from(sysroot.trim()),
    })
}

pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
}

fn ensure_bpf_linker() -> Result<()> {
    let nightly = nightly()?;
    let home = cargo_home();
    let stamp = home.join("watchdog-bpf-linker.stamp");
    let wanted_stamp = format!("bpf-linker {BPF_LINKER_VERSION}\n{}", nightly.version_text);
    let linker_runs = Command::new(home.join("bin").join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if linker_runs && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted_stamp) {
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} (about a minute)",
        nightly.llvm_major
    ));
    let llvm_dir = home
        .join("watchdog-llvm")
        .join(format!("llvm-{}", nightly.llvm_major));
    install_nightly_libllvm(&nightly, &llvm_dir)?;
    let mut cmd = Command::new("cargo");
    cmd.env("LLVM_PREFIX", &llvm_dir)
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--locked",
            "--no-default-features",
        ])
        .args(["--version", BPF_LINKER_VERSION])
        .args(["--features", &format!("llvm-{}", nightly.llvm_major)])
        .arg("--root")
        .arg(&home);
    run_checked(cmd)?;
    fs::write(&stamp, wanted_stamp).with_context(|| format!("writing {}", stamp.display()))
}

/// Copies the nightly's libLLVM (the real shared object, not the linker script beside it)
/// where bpf-linker's build looks for it. A copy, so a `rustup update` cannot pull the
/// library from under the installed linker.
fn install_nightly_libllvm(nightly: &Nightly, llvm_dir: &std::path::Path) -> Result<()> {
    let lib_dir = nightly.sysroot.join("lib");
    let real = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
                && fs::read(p).is_ok_and(|b| b.starts_with(b"\x7fELF"))
        });
    let Some(real) = real else {
        bail!(
            "no libLLVM.so.* in {}: reinstall the nightly toolchain (`rustup toolchain install nightly`)",
            lib_dir.display()
        );
    };
    let dest_dir = llvm_dir.join("lib");
    fs::create_dir_all(&dest_dir).with_context(|| format!("creating {}", dest_dir.display()))?;
    let dest = dest_dir.join(real.file_name().expect("a file"));
    fs::copy(&real, &dest)
        .with_context(|| format!("copying {} to {}", real.display(), dest.display()))?;
    let link = dest_dir.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(dest.file_name().expect("a file"), &link)
        .with_context(|| format!("linking {}", link.display()))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
