// Rebuild the kernel programs when the linker changes: a new bpf-linker (e.g. rebuilt for
// a new nightly's LLVM) can produce a different object from the same source.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
