// Builds the kernel programs (watchdog-ebpf) with the nightly toolchain and bpf-linker
// that `cargo xtask setup` installs; the object is embedded into the daemon binary.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("watchdog-user is one level below the workspace")
        .join("watchdog-ebpf");
    let root = root.to_str().expect("a UTF-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "watchdog-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
